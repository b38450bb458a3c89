"""The persistent compilation cache never hangs a multi-process job: the same job run again on a
warm cache, a job restarted by the launcher, and the README's multi-host command run ten times in a
row all finish (docs/cpu-collectives.md, "The compilation cache")."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from jaxdist import UsageError
from jaxdist.cluster import enable_compilation_cache
from runs import STEP_EVENTS, Run

FAIL_SAFE = 600  # only turns a hung run into a failure
CACHE_HIT = "Persistent compilation cache hit"


def _launch(layout, mnist_args, cache, extra_env=None):
    processes, devices = layout
    return subprocess.run(
        [sys.executable, "-m", "jaxdist.launch", "-n", str(processes), "--devices_per_process",
         str(devices), "--", sys.executable, "-m", "experiments.mnist", *mnist_args,
         "--compile_cache", str(cache), "--hang_timeout", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=FAIL_SAFE,
        env={**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})})


def _same_job_twice_on_one_cache(layout, tmp_path):
    cache = tmp_path / "xla"
    args = ["--max_steps", "30", "--eval_examples", "500"]
    first = _launch(layout, args, cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    # JAX_LOG_COMPILES makes each cache hit a line: every process loads programs it wrote itself
    second = _launch(layout, args, cache, {"JAX_LOG_COMPILES": "1"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert "done: test accuracy" in second.stdout
    for process in range(layout[0]):
        assert any(line.startswith(f"[p{process}] ") and CACHE_HIT in line
                   for line in second.stdout.splitlines()), f"process {process} loaded nothing"


def test_a_2x2_job_run_twice_on_one_cache_directory_finishes_and_loads_its_programs(
        mnist, tmp_path):
    _same_job_twice_on_one_cache((2, 2), tmp_path)


@pytest.mark.slow
def test_a_2x4_job_run_twice_on_one_cache_directory_finishes_and_loads_its_programs(
        mnist, tmp_path):
    _same_job_twice_on_one_cache((2, 4), tmp_path)


def test_a_job_the_launcher_restarts_on_its_warm_cache_finishes(mnist, tmp_path):
    run_dir, workdir, cache = tmp_path / "launch", tmp_path / "work", tmp_path / "xla"
    run = Run(["-n", "2", "--devices_per_process", "2", "--max_restarts", "1", "--run_dir",
               str(run_dir), "--", sys.executable, "-m", "experiments.mnist", "--max_steps", "120",
               "--eval_examples", "500", "--workdir", str(workdir), "--checkpoint_every", "10",
               "--compile_cache", str(cache), "--hang_timeout", "0", *STEP_EVENTS],
              module="jaxdist.launch")

    def kill_process_1():  # every program of the step has been compiled and written by now
        pid = json.loads((run_dir / "slot_1.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)

    status, output = run.act_at_step(25, kill_process_1)
    assert status == 0, output[-3000:]
    assert "restart 1/1" in output
    resumed = re.search(r"resuming at step (\d+)", output)
    assert resumed and int(resumed.group(1)) < 120  # the restart trains steps on a warm cache
    assert "done: test accuracy" in output


@pytest.mark.slow
def test_ten_back_to_back_runs_of_the_readme_multi_host_command_all_finish(mnist, tmp_path):
    cache = tmp_path / "xla"
    for attempt in range(10):
        result = _launch((2, 4), ["--strategy", "shard_map", "--epochs", "1"], cache)
        assert result.returncode == 0, (f"run {attempt + 1} of 10:\n" + result.stdout[-3000:]
                                        + result.stderr[-2000:])
        assert "done: test accuracy" in result.stdout


def test_a_compilation_cache_directory_that_cannot_be_created_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="not writable"):
        enable_compilation_cache(blocker / "xla")


class _CoordinatorStore:
    """The coordinator's key-value store as one process sees it: set once, read or time out."""

    def __init__(self, store: dict):
        self.store = store

    def key_value_set(self, key, value):
        if key in self.store:
            raise RuntimeError(f"ALREADY_EXISTS: {key}")
        self.store[key] = value

    def blocking_key_value_get(self, key, timeout_in_ms):
        if key not in self.store:
            raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
        return self.store[key]


def _as_process(monkeypatch, process_id, store):
    from jaxdist.cluster import compile_cache

    monkeypatch.setattr(compile_cache, "_job", lambda: (process_id, 2, _CoordinatorStore(store)))
    return compile_cache.agree_all_hold


def test_processes_load_a_cached_program_only_when_every_one_holds_it(monkeypatch):
    store = {"p/1": "1"}  # process 1 answered first: it holds the program
    assert _as_process(monkeypatch, 0, store)("p", True)
    assert store["p/verdict"] == "load"  # what process 1 reads once its own verdict is refused
    store = {"q/1": "0"}  # process 1 does not hold it: both compile
    assert not _as_process(monkeypatch, 0, store)("q", True)


def test_a_process_that_waited_in_vain_makes_every_process_compile(monkeypatch):
    store: dict = {}
    # process 0 finds no answer from process 1 (which never compiles the program, or is far behind)
    assert not _as_process(monkeypatch, 0, store)("r", True)
    assert store["r/verdict"] == "compile"
    # process 1 arrives late holding it too: it sees process 0's "1" but obeys the verdict
    assert not _as_process(monkeypatch, 1, store)("r", True)
