"""Observability: metrics.jsonl and TensorBoard events, goodput, MFU, profiles, plots, hangs."""

from __future__ import annotations

import json
import dataclasses
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import REPO
from jaxdist.observe.flops import default_peak_tflops, flops_per_step, mfu
from jaxdist.observe.goodput import Goodput
from jaxdist.observe.watchdog import ProgressStatus, Watchdog, diagnose_hang
from jaxdist.observe.writer import MetricsWriter, read_records
from task import QUIET


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist):
    """One smoke run (8 steps) with a logdir and a profile of steps 2-3; its logdir."""
    from experiments import mnist as experiment

    logdir = tmp_path_factory.mktemp("run") / "logs"
    code = experiment.main(["--config", "smoke", "--logdir", str(logdir), "--profile_steps",
                            "2,3", "--progress", "false", "--compile_cache", "off"])
    assert code == 0
    return logdir


def _by_kind(logdir):
    records = read_records(logdir)
    kinds: dict[str, list] = {}
    for r in records:
        kinds.setdefault(r["kind"], []).append(r)
    return kinds


def test_a_run_with_a_logdir_writes_jsonl_records_of_every_step_epoch_and_the_run(run):
    kinds = _by_kind(run)
    meta = kinds["meta"][0]
    assert (meta["devices"], meta["strategy"], meta["global_batch"], meta["model"]) == (
        8, "jit", 128, "cnn")
    train = kinds["train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:
        assert {"loss", "accuracy", "step_seconds", "images_per_second", "time"} <= set(r)
        assert r["step_seconds"] > 0 and r["images_per_second"] > 0
    assert kinds["compile"][0]["compile_seconds"] == train[0]["step_seconds"]
    assert kinds["compile"][0]["flops_per_device_step"] > 0
    assert kinds["compile"][0]["collective_bytes"] > 0  # the jit step all-reduces gradients
    assert 0 < kinds["epoch"][0]["mfu"] < 1
    assert 0 < kinds["eval"][0]["test_accuracy"] <= 1
    assert kinds["goodput"][-1]["final"] is True


def test_tensorboard_event_files_read_back_with_the_logged_values(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(run.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run))
    acc.Reload()
    kinds = _by_kind(run)
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in kinds["train"]}, rel=1e-6)
    [test] = acc.Scalars("eval/test_accuracy")
    assert (test.step, test.value) == (8, pytest.approx(kinds["eval"][0]["test_accuracy"]))
    tags = acc.Tags()["scalars"]
    for tag in ("train/accuracy", "train/images_per_second", "train/step_seconds",
                "compile/compile_seconds", "goodput/goodput", "goodput/step_seconds"):
        assert tag in tags


def test_goodput_parts_sum_to_no_more_than_the_wall_time(run):
    for report in _by_kind(run)["goodput"]:
        parts = sum(v for k, v in report.items() if k.endswith("_seconds") and k != "wall_seconds")
        assert parts == pytest.approx(report["wall_seconds"], rel=1e-6)  # with `other`
        assert parts - report["other_seconds"] <= report["wall_seconds"] + 1e-9
        assert report["goodput"] == pytest.approx(report["step_seconds"] / report["wall_seconds"])
        assert report["compile_seconds"] > 0 and report["step_seconds"] > 0


def test_nested_goodput_measurements_count_only_to_the_innermost_category():
    now = [0.0]
    g = Goodput(start=0.0, clock=lambda: now[0])
    with g.measure("eval"):
        now[0] += 2
        with g.measure("checkpoint"):
            now[0] += 3
        now[0] += 1
    with g.measure("data"):
        now[0] += 0.5
    now[0] += 0.5
    report = g.report()
    assert (report["eval_seconds"], report["checkpoint_seconds"], report["data_seconds"]) == (
        3, 3, 0.5)
    assert report["other_seconds"] == 0.5 and report["wall_seconds"] == 7
    assert report["goodput"] == 0


def test_profile_steps_write_a_trace_directory_with_files(run):
    files = [p for p in (run / "profile").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".xplane.pb") for p in files)
    assert all(p.stat().st_size > 0 for p in files)


def test_the_plot_command_writes_non_empty_pngs_including_scaling_across_device_counts(
        run, tmp_path):
    pytest.importorskip("matplotlib")
    from jaxdist.observe import plots

    # a second run "on 4 devices": the same records, other metadata and throughput
    other = tmp_path / "four"
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:
        for r in read_records(run):
            if r["kind"] == "meta":
                r["devices"] = 4
            if "images_per_second" in r:
                r["images_per_second"] /= 1.7
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "figures"
    assert plots.main([str(run), str(other), "--out", str(out)]) == 0
    for name in ("loss", "accuracy", "throughput", "goodput", "scaling", "collective_bytes"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name


def test_flops_are_read_from_dict_and_list_cost_analyses():
    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    assert flops_per_step(Compiled({"flops": 10.0, "bytes accessed": 3})) == 10.0
    assert flops_per_step(Compiled([{"flops": 10.0}, {"flops": 5.0}])) == 15.0
    assert flops_per_step(Compiled(None)) is None
    assert flops_per_step(Compiled({})) is None
    assert mfu(1e12, 2.0, 4.0) == pytest.approx(0.5)
    peak, note = default_peak_tflops()
    assert peak > 0 and "TFLOP/s" in note


def test_the_writer_on_other_processes_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "logs", enabled=False)
    writer.write("train", 1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "logs").exists()


def test_the_hang_message_names_the_process_that_is_behind_with_its_step_and_phase():
    statuses = {0: {"step": 57, "phase": "step"}, 1: {"step": 41, "phase": "data"},
                2: {"step": 57, "phase": "step"}, 3: {"step": 57, "phase": "checkpoint"}}
    assert diagnose_hang(statuses, 300, 4) == (
        "no progress for 300 s; process 1 is behind at step 41 (phase data), others at step 57")


def test_at_the_same_step_the_process_in_another_phase_is_named_and_silent_ones_too():
    statuses = {0: {"step": 9, "phase": "step"}, 1: {"step": 9, "phase": "step"},
                2: {"step": 9, "phase": "eval"}}
    message = diagnose_hang(statuses, 61, expected=4)
    assert "process 2 is behind at step 9 (phase eval), others at step 9" in message
    assert "process(es) 3 never reported" in message
    same = {p: {"step": 5, "phase": "step"} for p in range(2)}
    assert diagnose_hang(same, 10) == "no progress for 10 s; all 2 processes at step 5 (phase step)"


def test_the_watchdog_of_a_single_process_reports_a_stall_and_writes_a_status_file(tmp_path):
    status = ProgressStatus(tmp_path)
    status.update("data", 12)
    messages, reported = [], threading.Event()
    dog = Watchdog(status, timeout=0.3, interval=0.05,
                     log=lambda m: (messages.append(m), reported.set())).start()
    reported.wait(300)  # ends at the first report; the limit is only a fail-safe
    dog.stop()
    assert messages and re.fullmatch(r"no progress for \d+ s; process 0 at step 12 \(phase data\)",
                                     messages[0]), messages
    assert json.loads((tmp_path / "status" / "process_0.json").read_text())["step"] == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_their_status_through_the_kv_store_and_the_behind_one_is_named():
    script = textwrap.dedent("""
        import sys, threading, jax
        from jaxdist.cluster import configure_cpu_devices
        configure_cpu_devices(1)
        pid = int(sys.argv[1])
        jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=pid)
        from jaxdist.cluster.kv import client as _kv_client
        from jaxdist.observe.watchdog import KV_PREFIX, ProgressStatus, Watchdog
        status = ProgressStatus()
        status.update(*(("step", 57) if pid == 0 else ("data", 41)))
        status.publish()
        client = _kv_client()
        client.blocking_key_value_get(KV_PREFIX + str(1 - pid), 30_000)
        if pid == 1:  # alive and beating, never reporting itself
            beating = Watchdog(status, timeout=3600, interval=0.05).start()
        if pid == 0:
            reported = threading.Event()
            dog = Watchdog(status, timeout=0.2, interval=0.05,
                           log=lambda m: (print(m, flush=True), reported.set())).start()
            reported.wait(300)  # ends at the first report; the limit is only a fail-safe
            dog.stop()
        client.key_value_set(f"done/{pid}", "1")
        client.blocking_key_value_get(f"done/{1 - pid}", 30_000)
    """)
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(pid), address], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "process 1 is behind at step 41 (phase data), others at step 57" in outs[0], outs[0]


def test_profile_steps_without_a_logdir_is_a_usage_error(capsys):
    from experiments import mnist as experiment

    assert experiment.main(["--profile_steps", "2,3", "--progress", "false",
                            "--compile_cache", "off"]) == 2
    assert "--profile_steps needs --logdir" in capsys.readouterr().err
    assert experiment.main(["--profile_steps", "5,2", "--logdir", "x", "--progress", "false",
                            "--compile_cache", "off"]) == 2
    assert "1 <= A <= B" in capsys.readouterr().err


def test_a_process_that_stopped_beating_is_named_as_not_responding_whatever_its_step():
    now = 1000.0
    statuses = {0: {"step": 41, "phase": "step", "beat": now - 1},
                1: {"step": 41, "phase": "step", "beat": now - 25}}
    assert diagnose_hang(statuses, 20, 2, now=now, silent_after=10) == (
        "no progress for 20 s; process 1 is not responding (last heard 25 s ago, at step 41, "
        "phase step)")


def test_the_exit_action_writes_the_verdict_and_every_stack_then_exits_75(tmp_path, capsys):
    status = ProgressStatus(tmp_path)
    status.update("eval", 7)
    exits, done = [], threading.Event()
    dog = Watchdog(status, timeout=0.3, interval=0.05, action="exit",
                     exit=lambda code: (exits.append(code), done.set())).start()
    done.wait(300)  # ends at the action; the limit is only a fail-safe
    dog.stop()
    assert exits == [75]
    text = (tmp_path / "status" / "hang_process_0.txt").read_text()
    assert re.match(r"no progress for \d+ s; process 0 at step 7 \(phase eval\)", text)
    assert "most recent call first" in text and "_run" in text  # the watchdog's own thread too
    err = capsys.readouterr().err
    assert "error: hang: no progress for" in err and "process 0 exits 75" in err


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    """A run of the tests' task evaluated under eval_prefix "val" (as the LM's is): its epoch
    lines and logdir."""
    import optax
    from flax import nnx

    import jaxdist
    from task import MLP, arrays, eval_fn, loss_fn

    logdir = tmp_path_factory.mktemp("val") / "logs"
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), loss_fn, devices=2,
                              eval_fn=eval_fn)
    lines = []
    jaxdist.fit(trainer, jaxdist.data.from_arrays(arrays(512), global_batch=64), steps=16,
                eval_data=jaxdist.data.from_arrays(arrays(128, 1), global_batch=64),
                eval=jaxdist.EvalConfig(every=8, prefix="val"),
                observe=dataclasses.replace(QUIET, logdir=str(logdir)), log=lines.append)
    return [line for line in lines if line.startswith("epoch ")], logdir


def test_the_epoch_line_shows_the_metrics_of_any_eval_prefix(val_run):
    epochs, _ = val_run
    assert len(epochs) == 2
    for line in epochs:
        assert re.fullmatch(r"epoch \d \| step (8|16) \| train loss [\d.]+ \| "
                            r"val accuracy [\d.]+% \| val loss [\d.]+ \| [\d,]+ img/s", line), line


def test_the_monitor_writes_the_metrics_of_any_eval_prefix_as_eval_records_and_tags(val_run):
    _, logdir = val_run
    kinds = _by_kind(logdir)
    assert kinds["meta"][0]["eval_prefix"] == "val"
    assert [sorted(k for k in r if k.startswith("val_")) for r in kinds["eval"]] == [
        ["val_accuracy", "val_loss"]] * 2
    assert not any(k.startswith("val_") for r in kinds["epoch"] for k in r)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"eval/val_accuracy", "eval/val_loss"} <= set(tags)
    assert not [t for t in tags if t.startswith("epoch/val_")]
    losses = {e.step: e.value for e in acc.Scalars("eval/val_loss")}
    assert losses == pytest.approx({r["step"]: r["val_loss"] for r in kinds["eval"]}, rel=1e-6)


def test_the_plots_select_the_evaluation_under_the_runs_eval_prefix(val_run, tmp_path):
    pytest.importorskip("matplotlib")
    from jaxdist.observe import plots

    _, logdir = val_run
    run = plots.Run(logdir)
    want = [(r["step"], r["val_accuracy"]) for r in _by_kind(logdir)["eval"]]
    assert run.eval_prefix == "val" and run.evals("accuracy") == want and len(want) == 2
    assert run.throughput_key == "images_per_second"
    assert plots.main([str(logdir), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "accuracy.png").stat().st_size > 5000


def test_token_data_reports_tokens_per_second_in_the_epoch_line_and_the_records(tmp_path):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxdist

    class Bigram(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(256, 256, rngs=rngs)

        def __call__(self, tokens):
            return self.embed(tokens)

    def loss_fn(model, batch):
        inputs, targets = batch
        return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()

    seq = 8
    data = jaxdist.data.from_tokens((jnp.arange(4096) % 251).astype(jnp.uint8), seq_len=seq,
                                    global_batch=16)
    assert (data.unit, data.units_per_example) == ("tokens", seq)
    lines = []
    run = jaxdist.fit(jaxdist.Trainer(Bigram(nnx.Rngs(0)), optax.adam(1e-2), loss_fn, devices=2),
                      data, steps=6, observe=dataclasses.replace(QUIET, logdir=str(tmp_path)),
                      log=lines.append)
    [line] = [line for line in lines if line.startswith("epoch ")]
    assert re.fullmatch(r"epoch 1 \| step 6 \| train loss [\d.]+ \| [\d,]+ tokens/s", line), line
    [epoch] = run.history
    assert epoch["tokens_per_second"] == pytest.approx(seq * epoch["images_per_second"])
    train = _by_kind(tmp_path)["train"]
    assert all(r["tokens_per_second"] == pytest.approx(seq * r["images_per_second"])
               for r in train)
