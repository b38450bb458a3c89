"""The benchmarks: each refuses bad input with one line and the usage exit code before measuring
anything, prints its help, and writes its result as a dated markdown file only when asked."""

import importlib
import subprocess
import sys
import typing

import pytest

from benchmarks import comm, harness, lm_torch, multiprocess, parallel, time_to_accuracy, vs_torch
from conftest import REPO
from hf_support import transformers  # noqa: F401 - the fixture (the reference venv)
from jaxdist.config import field_docs
from jaxdist.errors import EXIT_USAGE
from jaxdist.observe.flops import measure_matmul_peak
from jaxdist.observe.machine import physical_cores, theoretical_peak_flops, vector_flops_per_cycle

BENCHMARKS = ("checkpoint", "comm", "dp", "lm", "lm_torch", "moe", "multiprocess", "network",
              "parallel", "pipeline", "restart", "time_to_accuracy", "vs_torch")


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as ended:  # argparse's own errors
        return ended.code


@pytest.mark.parametrize("command,argv,message", [
    (multiprocess, ["--layouts", "3"], "layout '3' is not PxD"),
    (multiprocess, ["--layouts", "0x2"], "needs at least 1 process and 1 device"),
    (multiprocess, ["--strategies", "fsdp"], "unknown strategy 'fsdp'"),
    (multiprocess, ["--layouts", "3x3"], "does not split over 3x3 devices"),
    (time_to_accuracy, ["--seeds", "a"], "argument --seeds"),
    (time_to_accuracy, ["--compute_dtypes", "fp8"],
     "argument --compute_dtypes: 'fp8' is not one of float32, bfloat16"),
    (vs_torch, ["--compute_dtypes", "float32,float16"],
     "argument --compute_dtypes: 'float16' is not one of float32, bfloat16"),
    (vs_torch, ["--microbatches", "3"], "--microbatches 3 does not split the global batch 512"),
    (parallel, ["--configs", "fsdp"], "--configs 'fsdp': expected STRATEGY:MESH"),
    (parallel, ["--configs", "fsdq:fsdp=8"], "unknown strategy 'fsdq'; choose one of dp,"),
    (parallel, ["--configs", "dp:data=8;fsdp:data=3"], "mesh data=3 needs 3 devices"),
    (comm, ["--options", "fp32,fp4"], "argument --options: 'fp4' is not one of fp32, bf16,"),
    (comm, ["--config", "smoke"], "unknown --config 'smoke'"),
    (lm_torch, ["--size", "huge"], "unknown Llama size 'huge'"),
    (lm_torch, ["--warmup", "0"], "--warmup (it compiles), --steps, --rounds and --peak_size"),
])
def test_a_benchmark_given_bad_input_exits_with_the_usage_code_and_one_line(capsys, command, argv,
                                                                             message):
    assert _exit_code(command.main, argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_communication_options_are_the_literal_the_flag_accepts():
    assert typing.get_args(comm.Option) == tuple(comm.OPTIONS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_prints_its_help_with_a_line_per_flag(name):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = importlib.import_module(f"benchmarks.{name}").Config
    for field in field_docs(config):
        assert f"--{field}" in proc.stdout
    assert "--out" in proc.stdout


@pytest.mark.parametrize("reference", ["torch_reference.py", "torch_lm_reference.py"])
def test_the_pytorch_references_run_without_jax(reference):
    """The PyTorch references run under an interpreter with only torch, numpy (and transformers):
    their imports at module level are the standard library's."""
    import ast

    tree = ast.parse((REPO / "benchmarks" / reference).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module}
    assert top <= {"__future__", "argparse", "json", "os", "socket", "sys", "time"}, top


def test_a_run_writes_a_dated_result_file_only_when_asked(tmp_path, capsys):
    from benchmarks import checkpoint

    small = ["--width", "16", "--layers", "1", "--rounds", "1", "--dir", str(tmp_path / "ckpt")]
    assert checkpoint.main(small) == 0
    out = capsys.readouterr().out
    assert "| mode | blocking s | total s | GB/s |" in out and " cores, Python " in out
    assert not list(tmp_path.glob("*.md"))
    assert checkpoint.main([*small, "--out", str(tmp_path)]) == 0
    assert checkpoint.main([*small, "--out", str(tmp_path)]) == 0
    names = sorted(p.name[len("YYYY-MM-DD-"):] for p in tmp_path.glob("*.md"))
    assert names == ["checkpoint-2.md", "checkpoint.md"]  # the second run the same day: -2
    text = next(tmp_path.glob("*-checkpoint.md")).read_text()
    assert text.startswith("# benchmarks.checkpoint\n")
    assert "- command: `python -m benchmarks.checkpoint --width 16 --layers 1 --rounds 1 --dir " \
        in text
    assert "| async |" in text and "| sync |" in text


def test_rounds_alternate_and_report_their_median():
    calls = []
    measures = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "ab"}
    rounds = harness.alternate(measures, 3)
    assert calls == ["a", "b"] * 3
    assert rounds["a"].values == (1, 3, 5) and rounds["b"].median == 4
    assert harness.markdown_table(["x", "y"], [(1, "2")]) == "| x | y |\n|---|---|\n| 1 | 2 |"


def test_the_theoretical_peak_counts_fma_lanes_per_cycle_from_the_vector_flags():
    intel = {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}
    assert vector_flops_per_cycle(intel, "GenuineIntel")[0] == 64  # 2 units x 16 lanes x FMA
    assert vector_flops_per_cycle(intel, "GenuineIntel", "bfloat16") == (
        1024, "1024 bf16 FLOP/cycle (AMX tiles)")
    assert vector_flops_per_cycle(intel - {"amx_bf16"}, "GenuineIntel", "bfloat16")[0] == 128
    assert vector_flops_per_cycle({"avx2", "fma", "avx512f"}, "AuthenticAMD")[0] == 32  # Zen 4
    assert vector_flops_per_cycle({"avx2", "fma"}, "AuthenticAMD", "bfloat16")[0] == 32
    assert vector_flops_per_cycle({"sse2"}, "GenuineIntel") is None
    assert vector_flops_per_cycle(intel, "GenuineIntel", "float16") is None
    two_threads_of_one_core = "physical id: 0\ncore id: 0\n\nphysical id: 0\ncore id: 0\n"
    assert physical_cores(two_threads_of_one_core) == 1
    peak, how = theoretical_peak_flops()
    assert (peak is None and "unknown" in how) or (peak > 0 and "GHz" in how and "cores x" in how)


def test_the_measured_matmul_peak_is_a_rate_of_flops():
    assert measure_matmul_peak("float32", 64, iters=2, repeats=1) > 1e6
    assert measure_matmul_peak("bfloat16", 64, iters=2, repeats=1) > 1e6


@pytest.mark.slow  # torch.compile's compilation: 35-60 s
def test_the_lm_against_pytorch_times_jaxdist_eager_and_compiled_in_one_table(capsys,
                                                                             transformers):
    python = lm_torch.find_torch_python(None)  # the reference venv the fixture made, or yours
    tiny = ["--torch_python", python, "--size", "test", "--seq_len", "16", "--batch", "2",
            "--warmup", "1", "--steps", "1", "--rounds", "1", "--peak_size", "64"]
    assert lm_torch.main(tiny) == 0
    out = capsys.readouterr().out
    assert " torch 2." in out and " transformers " in out  # the machine line
    assert "- float32 peak: measured " in out and "- bfloat16 peak: measured " in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert list(rows) == ["jaxdist", "PyTorch eager", "PyTorch torch.compile"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows.values())
    assert all(row[4].strip(" |").endswith("%") for row in rows.values())
    assert "jaxdist / best PyTorch (PyTorch " in out
