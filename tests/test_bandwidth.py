"""`jaxdist.launch --bandwidth RATE`: the job's processes share a loopback that carries at most
RATE, in a network namespace of their own; a probe says what the limit really gives; the job's
results do not change; and the namespace, with every process in it, is gone however the launcher
ends: done, restarts used up, SIGTERM, SIGINT, SIGKILL. Bad input is one line and exit 2.

Needs root, `ip`, `tc` and the kernel's tbf qdisc; skips saying which is missing."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from jaxdist.cluster.bandwidth import (LO_PACKET, LimitedLoopback, format_rate, parse_rate,
                                       tbf_parameters, transfer)
from jaxdist.errors import EXIT_USAGE, UsageError
from jaxdist.io import read_checkpoint_arrays
from jaxdist.launch import main
from runs import Run

WORKER = str(REPO / "tests" / "fit_worker.py")
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
STEPS = 20
PROBE = re.compile(r"\[launch\] bandwidth: asked (\S+), measured ([\d.]+) (\S+) over loopback "
                   r"in netns (jaxdist-[0-9a-f]+)")
# a command that leaves a process of its own behind in the namespace, then waits
LEAVES_ONE = "sleep 600 >/dev/null 2>&1 & echo ready; wait"
# a job that reports steps without JAX's start-up, and does not end when its output is gone
STEPPING = ("trap '' PIPE; i=0; while :; do i=$((i+1)); echo \"| step $i/1000000\"; "
            "sleep 0.05; done")
IP = shutil.which("ip") or "ip"  # found before a test narrows PATH


@pytest.fixture(scope="module")
def netns():
    """Skips, saying what is missing, where a limited loopback cannot be made."""
    try:
        with LimitedLoopback("1gbit"):
            pass
    except UsageError as e:
        pytest.skip(str(e))


def _namespaces() -> set[str]:
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


def _pid(tmp_path, slot) -> int:
    return json.loads((tmp_path / "run" / f"slot_{slot}.json").read_text())["pid"]


def _launch(tmp_path, *launch_args, command=None, processes=2, steps=STEPS) -> Run:
    command = command or [sys.executable, WORKER, str(tmp_path / "final.npz"), "jit",
                          str(steps), str(tmp_path / "work")]
    return Run(["-m", "jaxdist.launch", "-n", str(processes), "--devices_per_process", "2",
                "--run_dir", str(tmp_path / "run"), *launch_args, "--", *command],
               module=None, env=ENV)


def _probed(run: Run) -> re.Match:
    return run.wait_for(PROBE.search, "the probe line")


@pytest.mark.parametrize("text, bits", [
    ("1gbit", 1e9), ("100mbit", 100e6), ("500kbit", 500e3), ("2.5Gbit", 2.5e9),
    ("1gibit", 2**30), ("12.5mbps", 100e6),  # tc's bps is bytes per second
])
def test_rates_are_read_in_tcs_syntax(text, bits):
    assert parse_rate(text) == bits


def test_measured_rates_are_written_to_3_digits_in_the_largest_unit():
    assert [format_rate(b) for b in (97.34e6, 999.6e6, 1.0234e9, 404.2e3)] == [
        "97.3 Mbit/s", "1 Gbit/s", "1.02 Gbit/s", "404 kbit/s"]


def test_the_bucket_holds_a_whole_loopback_packet_and_10_ms_and_the_queue_4_packets():
    for bits in (500e3, 10e6, 1e9, 100e9):
        burst, latency = tbf_parameters(int(bits))
        assert burst >= LO_PACKET and burst >= bits / 8 * 0.010
        assert latency >= 0.050 and latency * bits / 8 >= 4 * LO_PACKET


def test_a_transfer_through_the_limited_loopback_takes_its_size_over_the_rate(netns):
    rate, size = 200e6, 25_000_000  # about 1 s at the rate
    with LimitedLoopback("200mbit") as net:
        timed, limited = net.transfer(size)
    # a token bucket passes its burst at once, then no more than the rate
    assert limited >= (timed - net.burst) * 8 / rate * 0.95, limited
    assert limited <= timed * 8 / rate * 1.5, f"{limited} s: the limit is not what sets the time"
    _, free = transfer(size)  # the same transfer over this machine's own loopback
    assert free * 4 < limited, (free, limited)


@pytest.mark.slow  # two 2-process trainings: ~35 s
def test_a_2_process_job_under_200mbit_ends_bitwise_equal_to_the_same_job_without(netns,
                                                                                  tmp_path):
    free, limited = tmp_path / "free", tmp_path / "limited"
    code, log = _launch(free).finish()
    assert code == 0, log[-3000:]
    run = _launch(limited, "--bandwidth", "200mbit")
    code, log = run.finish()
    assert code == 0, log[-3000:]
    probe = PROBE.search(log)
    assert probe and probe[1] == "200mbit" and probe[3] == "Mbit/s", log[-3000:]
    assert 150 <= float(probe[2]) <= 210, probe[0]
    assert "on 4 devices of 2 process(es)" in log
    assert f"[launch] network namespace {probe[4]} removed\n" in log
    assert probe[4] not in _namespaces()
    want = read_checkpoint_arrays(free / "work" / "checkpoints", STEPS)
    got = read_checkpoint_arrays(limited / "work" / "checkpoints", STEPS)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("job", ["stepping", pytest.param("training", marks=pytest.mark.slow)])
def test_a_sigkilled_launcher_leaves_no_namespace_and_no_process_of_the_job(netns, tmp_path,
                                                                            job):
    command = ["sh", "-c", STEPPING] if job == "stepping" else None
    run = _launch(tmp_path, "--bandwidth", "1gbit", command=command, steps=10_000)
    pids = []

    def kill_the_launcher():
        pids.extend(_pid(tmp_path, slot) for slot in (0, 1))
        run.send(signal.SIGKILL)

    try:
        name = _probed(run)[4]
        code, log = run.act_at_step(5, kill_the_launcher)
    finally:
        run.kill()
    assert code == -signal.SIGKILL and "done:" not in log
    removed = run.wait_for_text(f"[launch] network namespace {name} removed")  # by the keeper
    if job == "stepping":  # still running when the launcher died: the keeper ended them
        assert int(re.search(r"ended (\d+) process", removed)[1]) >= 2, removed
    assert name not in _namespaces()
    assert not [pid for pid in pids if _alive(pid)], "job processes outlived the launcher"


@pytest.mark.parametrize("sig", [signal.SIGTERM,  # SIGINT takes the same path
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signalled_launcher_removes_the_namespace_with_what_the_job_left_in_it(netns, tmp_path,
                                                                                 sig):
    run = _launch(tmp_path, "--bandwidth", "100mbit", processes=1,
                  command=["sh", "-c", LEAVES_ONE])
    try:
        name = _probed(run)[4]
        run.wait_for_text("[p0] ready")
        run.send(sig)
        code, log = run.finish()
    finally:
        run.kill()
    assert "passing it on" in log
    assert f"[launch] network namespace {name} removed; ended 1 process(es) left in it" in log
    assert name not in _namespaces()


def test_a_job_whose_restarts_are_used_up_leaves_no_namespace(netns, tmp_path):
    run = _launch(tmp_path, "--bandwidth", "100mbit", "--max_restarts", "1", processes=1,
                  command=["sh", "-c", "sleep 600 >/dev/null 2>&1 & exit 3"])
    code, log = run.finish()
    assert code == 3, log[-2000:]
    assert "restart 1/1" in log and "restarts used up: 1" in log
    name = PROBE.search(log)[4]
    # one process left behind by each of the 2 starts
    assert f"[launch] network namespace {name} removed; ended 2 process(es) left in it" in log
    assert name not in _namespaces()


@pytest.mark.parametrize("rate, message", [
    ("fast", "--bandwidth 'fast' is not a rate in tc's syntax"),
    ("100", "--bandwidth '100' has no unit"),
    ("100kbit", "--bandwidth 100kbit is outside 500kbit..100gbit"),
    ("1tbit", "--bandwidth 1tbit is outside 500kbit..100gbit"),
])
def test_a_bad_rate_exits_2_with_one_line(capsys, rate, message):
    code = main(["--bandwidth", rate, "--", sys.executable, "-c", "pass"])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE and message in err, err
    assert len(err.splitlines()) == 1 and not out


def _path_with(tmp_path, **tools) -> str:
    """A PATH holding only `tools`: name -> the file it runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in tools.items():
        (bin_dir / name).symlink_to(target)
    return str(bin_dir)


@pytest.mark.parametrize("tools, message", [
    ({}, "--bandwidth needs `ip` (package iproute2), which is not on PATH"),
    ({"ip": "ip"}, "--bandwidth needs `tc` (package iproute2), which is not on PATH"),
    ({"ip": "ip", "tc": "no_tbf"},
     "--bandwidth needs the kernel's tbf qdisc, which this kernel lacks"),
])
def test_without_ip_tc_or_tbf_the_launcher_exits_2_with_one_line_saying_which(
        netns, capsys, monkeypatch, tmp_path, tools, message):
    no_tbf = tmp_path / "tc_without_tbf"  # what tc says on a kernel without sch_tbf
    no_tbf.write_text("#!/bin/sh\necho 'Error: Specified qdisc kind is unknown.' >&2\nexit 2\n")
    no_tbf.chmod(0o755)
    files = {"ip": shutil.which("ip"), "no_tbf": str(no_tbf)}
    monkeypatch.setenv("PATH", _path_with(tmp_path, **{k: files[v] for k, v in tools.items()}))
    before = _namespaces()
    code = main(["--bandwidth", "100mbit", "--", sys.executable, "-c", "pass"])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE and message in err, err
    assert len(err.splitlines()) == 1 and not out
    assert _namespaces() <= before  # the half-made one is removed


def test_without_root_the_launcher_exits_2_with_one_line(netns):
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv (util-linux) to drop this process's capabilities")
    # root without capabilities: what a non-root user has
    done = subprocess.run([setpriv, "--bounding-set", "-all", "--inh-caps", "-all", "--",
                           sys.executable, "-m", "jaxdist.launch", "--bandwidth", "100mbit",
                           "--", sys.executable, "-c", "pass"],
                          cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stderr.startswith("error: --bandwidth needs root"), done.stderr
    assert len(done.stderr.splitlines()) == 1 and not done.stdout


# -- benchmarks.network: the planner against measurement, and when compression pays

def test_the_crossover_is_the_rate_where_two_time_to_target_lines_meet():
    from benchmarks.network import crossover, line

    # fp32: 100 steps of 10 ms + 8 Mbit per step; int8: 120 steps of 12 ms + 2 Mbit per step
    fp32 = line([(r, 0.010 + 8e6 / r) for r in (1e8, 1e9)])
    int8 = line([(r, 0.012 + 2e6 / r) for r in (1e8, 1e9)])
    assert fp32 == pytest.approx((0.010, 8e6)) and int8 == pytest.approx((0.012, 2e6))
    rate = crossover(120, *int8, 100, *fp32)
    # 120 (0.012 + 2e6 / r) = 100 (0.010 + 8e6 / r)  <=>  r = (800e6 - 240e6) / (1.44 - 1.0)
    assert rate == pytest.approx(560e6 / 0.44)
    assert crossover(100, *fp32, 100, *fp32) is None  # the same line meets nowhere


def test_the_probe_line_gives_the_rate_the_models_are_given():
    from benchmarks.network import measured_rate

    line = "[launch] bandwidth: asked 100mbit, measured 97.3 Mbit/s over loopback in netns x"
    assert measured_rate(line) == pytest.approx(97.3e6)
    assert measured_rate("bandwidth: asked 1gbit, measured 1.02 Gbit/s over") == 1.02e9
    assert measured_rate("no limit") is None


@pytest.mark.parametrize("argv,message", [
    (["--rates", "fast"], "fast"),
    (["--processes", "1"], "at least 2 processes"),
    (["--part", "accuracy", "--processes", "4"], "include 2 in --processes"),
    (["--options", "zip"], "'zip' is not one of"),
])
def test_the_network_benchmark_refuses_bad_input_in_one_line(capsys, argv, message):
    from benchmarks import network

    try:
        code = network.main(argv)
    except SystemExit as ended:  # argparse's own errors
        code = ended.code
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_the_network_benchmark_puts_the_planner_beside_a_measured_limited_step(netns):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.network", "--part", "planner", "--models", "cnn",
         "--options", "fp32", "--processes", "2", "--rates", "50mbit", "--steps", "8",
         "--warmup", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| cnn |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["2", "50mbit"] and cells[4].endswith("Mbit/s")
    assert float(cells[5]) == pytest.approx(21840 * 4 / 2**20, rel=0.05)  # the CNN's fp32 grads
    assert all(float(c) > 0 for c in cells[6:9])
