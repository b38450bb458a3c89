"""`python -m experiments.mnist`: a smoke run trains; each bad input exits 2 with one line."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import mnist


def run_module(args, timeout=240, env=None, module="experiments.mnist"):
    """Runs the experiment in a fresh process; a hang is killed (SIGKILL) and fails the test."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def test_smoke_run_of_the_experiment_trains_on_8_devices_and_prints_a_summary(mnist):
    proc = run_module(["--config", "smoke", "--progress", "false"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: test accuracy")
    assert "8 cpu device(s)" in last and "strategy jit" in last


@pytest.mark.parametrize("module,strategy", [("experiments.vit", "fsdp_tp"),
                                             ("experiments.wide_cnn", "fsdp")])
def test_smoke_runs_of_the_model_parallel_experiments_train(mnist, module, strategy):
    proc = run_module(["--config", "smoke", "--progress", "false"], module=module)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("done: test accuracy")
    assert f"strategy {strategy} over mesh" in proc.stdout


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--strategy", "--devices", "--global_batch", "--epochs", "--optimizer",
                 "--learning_rate", "--seed", "--data_dir"):
        assert flag in out


def _exit_code_and_stderr(capsys, argv):
    try:
        code = mnist.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--global_batch", "100", "--devices", "8"], "global batch 100 does not divide over 8 devices"),
        (["--strategy", "ddp"], "invalid choice: 'ddp'"),
        (["--optimizer", "adagrad"], "invalid choice: 'adagrad'"),
        (["--devices", "64"], "asked for 64 devices but only 8 cpu device(s) exist"),
        (["--config", "huge"], "unknown config variant 'huge'"),
        (["--epochs", "abc"], "invalid float value: 'abc'"),
        (["--strategy", "fsdp", "--mesh", "data=3,fsdp=2"], "needs 6 devices, but 8 are in use"),
        (["--strategy", "tp", "--mesh", "tensor=8,experts=1"], "unknown mesh axis 'experts'"),
        (["--mesh", "data=8"], "--mesh is for the model-parallel strategies, not jit"),
        (["--model", "vit", "--vit_size", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    code, err = _exit_code_and_stderr(capsys, [*argv, "--progress", "false"])
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1


def test_missing_data_exits_2_saying_how_to_get_it(capsys, tmp_path):
    code, err = _exit_code_and_stderr(capsys, ["--data_dir", str(tmp_path), "--progress", "false"])
    assert code == 2
    assert "is not prepared" in err and "--download" in err and "TFDS_DATA_DIR" in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-written
