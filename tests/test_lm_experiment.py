"""`python -m experiments.lm`: learns on real text, reports bits per byte, tokens/s, MFU and a
sample, rejects bad input in one line, and a killed run resumes bitwise."""

from __future__ import annotations

import re
import signal

import numpy as np
import pytest

from experiments import lm
from jaxdist.errors import EXIT_USAGE
from jaxdist.io import read_checkpoint_arrays
from runs import STEP_EVENTS, Run

STEPS = 12
# the test LM, 12 steps, a checkpoint every 4, through a 2-stage 1F1B pipeline with data and
# tensor parallelism: the most moving parts a resume has to get right
RESUMABLE = ["--config", "smoke", "--max_steps", str(STEPS), "--checkpoint_every", "4",
             "--strategy", "fsdp_tp", "--mesh", "fsdp=2,pipeline=2,tensor=2",
             "--pipeline_schedule", "1f1b", "--sample_bytes", "0", *STEP_EVENTS]


@pytest.fixture
def cache(tmp_path_factory):
    return {"JAXDIST_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}


def test_the_smoke_run_learns_and_reports_bits_per_byte_tokens_per_second_mfu_and_a_sample(
        cache):
    code, log = Run(["--config", "smoke", "--max_steps", "12", "--eval_every", "6"],
                    module="experiments.lm", env=cache).finish()
    assert code == 0, log[-3000:]
    assert "prepared stdlib text:" in log or "cached stdlib text:" in log
    done = log.split("done: ")[1]
    first = float(done.split("(first eval ")[1].split(")")[0])
    last = float(done.split("nats/token, ")[1].split(" bits/byte")[0])
    assert last < first < 8.0  # a uniform guess over 256 bytes is 8 bits
    assert "tokens/s" in done and "MFU" in done and "a measured fp32 matmul peak" in done
    assert "sample:\n  | def " in log
    # each evaluation's epoch line shows the validation metrics and the throughput in tokens
    epochs = re.findall(r"^epoch \d+ \| step (\d+) \| train loss [\d.]+ \| val bits per byte "
                        r"([\d.]+) \| val loss [\d.]+ \| [\d,]+ tokens/s$", log, re.MULTILINE)
    assert [int(step) for step, _ in epochs] == [6, 12], log[-3000:]
    assert float(epochs[-1][1]) == pytest.approx(last, abs=1e-3)


def test_a_llama_learns_bpe_tokens_of_packed_documents_and_reports_bits_per_byte(cache):
    code, log = Run(["--model", "llama", "--config", "smoke", "--max_steps", "12",
                     "--eval_every", "6", "--vocab", "512"],
                    module="experiments.lm", env=cache).finish()
    assert code == 0, log[-3000:]
    assert re.search(r"(trained|cached) BPE tokenizer: vocabulary 512 ", log), log[-3000:]
    assert re.search(r"(prepared|cached) stdlib documents: \d+ files", log), log[-3000:]
    assert "x 32 tokens of a 512-token BPE" in log
    epochs = re.findall(r"^epoch \d+ \| step (\d+) \| train loss [\d.]+ \| "
                        r"val bits per token ([\d.]+) \| val loss ([\d.]+)", log, re.MULTILINE)
    assert [int(step) for step, _, _ in epochs] == [6, 12], log[-3000:]
    (_, first, _), (_, last, loss) = epochs
    assert float(last) < float(first) < 9.0  # a uniform guess over 512 tokens is 9 bits
    done = log.split("done: ")[1]
    assert f"val loss {float(loss):.3f} nats/token" in done
    bits_per_byte = float(done.split("nats/token, ")[1].split(" bits/byte")[0])
    assert 0 < bits_per_byte < float(last)  # a BPE token holds more than one byte
    assert "MFU" in done and "a measured fp32 matmul peak" in done
    assert "sample:\n  | def " in log


@pytest.mark.parametrize("argv,message", [
    (["--init_from", "somewhere"], "--init_from: options of --model llama"),
    (["--model", "llama", "--init_from", "/nonexistent"], "--init_from /nonexistent: no such"),
    (["--model", "llama", "--vocab", "100"], "a byte-level BPE needs at least 257 tokens"),
    (["--strategy", "shard_map"], "the LM trains under the sharding strategies"),
    (["--lm_size", "huge"], "invalid choice: 'huge'"),
    (["--mesh", "data=2,pipeline=4", "--lm_size", "test", "--pipeline_microbatches", "3"],
     "microbatch"),
    (["--text", "/nonexistent/*.txt"], "text pattern '/nonexistent/*.txt' matches no files"),
    (["--temperature", "0"], "temperature must be positive"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    # an accepted size that would exhaust memory: refused with the planner's estimate
    (["--lm_size", "7b"], "gpt-7b needs about"),
    (["--best_metric", "val_acc"],
     "--best_metric val_acc is not a metric of this run's evaluation; choose one of "
     "val_bits_per_byte, val_loss"),
])
def test_bad_input_exits_with_the_usage_code_and_one_line(capsys, argv, message, cache,
                                                          monkeypatch):
    monkeypatch.setenv("JAXDIST_CACHE_DIR", cache["JAXDIST_CACHE_DIR"])
    try:
        code = lm.main(["--config", "smoke", "--progress", "false", *argv])
    except SystemExit as e:  # a flag's own check, by the parser
        code = e.code
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def _final(workdir):
    return read_checkpoint_arrays(workdir / "checkpoints", STEPS)


@pytest.mark.parametrize("model", ["gpt", pytest.param("llama", marks=pytest.mark.slow)])
def test_an_lm_run_killed_mid_pipeline_and_rerun_ends_bitwise_equal(tmp_path, cache, model):
    argv = [*RESUMABLE, "--model", model, *(["--vocab", "512"] if model == "llama" else [])]
    straight = tmp_path / "straight"
    code, log = Run([*argv, "--workdir", str(straight)], module="experiments.lm",
                    env=cache).finish()
    assert code == 0, log[-3000:]
    work = tmp_path / "work"
    run = Run([*argv, "--workdir", str(work)], module="experiments.lm", env=cache)
    code, log = run.act_at_step(6, lambda: run.send(signal.SIGKILL))
    assert code == -signal.SIGKILL and "done:" not in log
    code, log = Run([*argv, "--workdir", str(work)], module="experiments.lm",
                    env=cache).finish()
    assert code == 0 and "resuming at step " in log, log[-3000:]
    want, got = _final(straight), _final(work)
    assert want.keys() == got.keys() and want
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
