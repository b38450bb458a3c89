"""The benchmarks: each refuses bad input with one line and the usage exit code before measuring
anything, prints its help, and writes its result as a dated markdown file only when asked."""

import importlib
import subprocess
import sys
import typing

import pytest

from benchmarks import comm, harness, multiprocess, parallel, time_to_accuracy, vs_torch
from conftest import REPO
from jaxdist.config import field_docs
from jaxdist.errors import EXIT_USAGE

BENCHMARKS = ("checkpoint", "comm", "dp", "lm", "multiprocess", "parallel", "restart",
              "time_to_accuracy", "vs_torch")


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


def test_the_pytorch_reference_runs_without_jax():
    """`torch_reference.py` runs under an interpreter with only torch and numpy: its imports at
    module level are the standard library's."""
    import ast

    tree = ast.parse((REPO / "benchmarks" / "torch_reference.py").read_text())
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
