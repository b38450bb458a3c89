"""`python -m experiments.mnist`: a smoke run trains; each bad input exits 2 with one line."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_TFDS
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


def test_a_workdir_or_logdir_that_is_a_file_exits_2_with_one_line(capsys, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a directory")
    for argv, message in [(["--workdir", str(afile)], f"--workdir {afile} is not a directory"),
                          (["--workdir", str(afile / "run")], f"({afile} is a file)"),
                          (["--logdir", str(afile)], f"--logdir {afile} is not a directory")]:
        code, err = _exit_code_and_stderr(capsys, [*argv, "--progress", "false",
                                                   "--compile_cache", "off"])
        assert code == 2, err
        assert message in err
        assert len(err.splitlines()) == 1


def test_off_a_terminal_progress_is_a_plain_line_per_interval_not_a_redrawn_bar(mnist):
    proc = run_module(["--config", "smoke", "--max_steps", "30", "--progress_every", "3600",
                       "--compile_cache", "off"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr  # nothing redrawn in place
    lines = [line for line in proc.stdout.splitlines() if "| step " in line and "/30" in line]
    assert lines == ["epoch 1/1 | step 30/30 | " + lines[-1].split(" | ", 2)[2]]  # the last only
    every = run_module(["--config", "smoke", "--max_steps", "5", "--progress_every", "0",
                        "--compile_cache", "off"])
    steps = [line.split(" | ")[1] for line in every.stdout.splitlines() if "/5 |" in line]
    assert steps == [f"step {k}/5" for k in range(1, 6)]


@pytest.mark.skipif(not SHARED_TFDS.exists(), reason="no ../shared/data/tensorflow_datasets here")
def test_without_tfds_data_dir_mnist_is_found_in_the_shared_folder_beside_the_repository(
        mnist, tmp_path):
    from jaxdist.data.tfds_source import default_cache_dir

    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    env.update(HOME=str(tmp_path), JAXDIST_CACHE_DIR=str(default_cache_dir()),
               PYTHONPATH=str(REPO))  # a home without ~/tensorflow_datasets
    proc = subprocess.run([sys.executable, "-m", "experiments.mnist", "--config", "smoke",
                           "--progress", "false", "--compile_cache", "off"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("done: test accuracy")


def test_missing_data_exits_2_saying_how_to_get_it(capsys, tmp_path):
    code, err = _exit_code_and_stderr(capsys, ["--data_dir", str(tmp_path), "--progress", "false"])
    assert code == 2
    assert "is not prepared" in err and "--download" in err and "TFDS_DATA_DIR" in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-written
