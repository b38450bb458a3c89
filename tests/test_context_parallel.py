"""Context parallelism: the Llama (and the GPT) with its sequence split over the mesh's `context`
axis (ring or all-gathered keys and values, zig-zag chunks, packed documents) trains as on one
device, and each device's attention temporaries fall as 1 / C."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from equivalence import assert_same_training, packed_document_batches, train_steps
from jaxdist import Pipeline, Trainer, UsageError
from jaxdist.models.attention import zigzag_order
from jaxdist.models.llama import Llama, llama_config, llama_eval, llama_loss
from jaxdist.models.lm import GPT, lm_config, lm_loss
from jaxdist.parallel.strategies import resolve

SEQ, BATCH, STEPS = 32, 4, 3
CFG = llama_config("test", seq_len=SEQ)  # 4 query heads sharing 2 key/value heads


def _batches():
    return packed_document_batches(CFG.vocab, steps=STEPS, batch=BATCH, seq=SEQ, cuts=(1, 5))


def _cp(strategy: str, attention: str):
    """A registry strategy with its attention over the context axis chosen."""
    return dataclasses.replace(resolve(strategy), context_attention=attention)


def _train(strategy="dp", mesh=""):
    return train_steps(lambda: Llama(CFG, rngs=nnx.Rngs(0)), llama_loss, _batches(),
                       strategy=strategy, mesh=mesh)


@pytest.fixture(scope="module")
def one_device():
    return _train()


slow = pytest.mark.slow
CASES = [
    ("dp", "ring", "context=8"),
    ("dp", "allgather", "data=2,context=4"),
    ("fsdp_tp", "ring", "fsdp=2,context=2,tensor=2"),
    pytest.param("dp", "allgather", "context=8", marks=slow),
    pytest.param("dp", "ring", "data=2,context=4", marks=slow),
    pytest.param("fsdp_tp", "allgather", "fsdp=2,context=2,tensor=2", marks=slow),
    pytest.param("sp", "ring", "data=2,context=2,tensor=2", marks=slow),
]


@needs_devices(8)
@pytest.mark.parametrize("strategy,attention,mesh", CASES)
def test_context_parallel_training_with_packed_documents_equals_one_device(
        one_device, strategy, attention, mesh):
    assert_same_training(_train(_cp(strategy, attention), mesh), one_device)


@needs_devices(8)
@pytest.mark.parametrize("attention,mesh", [
    ("ring", "context=8"), pytest.param("allgather", "data=2,context=4", marks=slow)])
def test_the_gpt_under_context_parallelism_trains_as_on_one_device(attention, mesh):
    cfg = lm_config("test", seq_len=SEQ)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab, (STEPS, BATCH, SEQ + 1), np.int32)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]

    def train(strategy="dp", mesh=""):
        return train_steps(lambda: GPT(cfg, rngs=nnx.Rngs(0)), lm_loss, batches,
                           strategy=strategy, mesh=mesh)

    assert_same_training(train(_cp("fsdp", attention), mesh), train())


@slow
@needs_devices(8)
def test_context_parallelism_inside_a_1f1b_pipeline_equals_one_device(one_device):
    pipeline = Pipeline(rules=_cp("fsdp", "ring"), schedule="1f1b", microbatches=2)
    assert_same_training(_train(pipeline, "pipeline=2,context=2,fsdp=2"), one_device)


@needs_devices(8)
def test_evaluation_logits_in_the_original_order_equal_one_device():
    """`model(tokens)` works in zig-zag order and puts the logits back: the evaluation's
    per-token losses against the targets in their own order are one device's."""
    inputs, targets, segments = _batches()[0]
    batch = [(inputs, targets, segments, np.ones(BATCH, np.float32))]

    trainer = Trainer(lambda: Llama(CFG, rngs=nnx.Rngs(0)), optax.sgd(0.1), llama_loss,
                      strategy=_cp("dp", "ring"), mesh="context=8", devices=8,
                      eval_fn=llama_eval)
    got = trainer.evaluate(trainer.init(), batch)
    want = jax.jit(llama_eval)(Llama(CFG, rngs=nnx.Rngs(0)), batch[0])
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)


def _attention_step(attention: str, ways: int, seq: int):
    """The compiled train step of a one-layer Llama whose memory is its attention: 8 heads over
    `seq` tokens of width 32, the sequence split over `ways` devices of the context axis."""
    cfg = llama_config("test", seq_len=seq, depth=1, heads=8, kv_heads=2, vocab=64)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab, (1, cfg.seq_len + 1), dtype=np.int32)
    trainer = Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(0)), optax.sgd(0.1), llama_loss,
                      strategy=_cp("dp", attention), mesh=f"context={ways}", devices=ways)
    batch = trainer.shard_batch((tokens[:, :-1], tokens[:, 1:]))
    return trainer.lower(trainer.abstract_state(), batch).compile()


@needs_devices(8)
@pytest.mark.parametrize("attention", ["ring", pytest.param("allgather", marks=slow)])
def test_attention_temporaries_per_device_fall_as_one_over_the_context_size(attention):
    """Measured from the compiled step's `memory_analysis()`: a ring holds two key blocks at a
    time, so C devices need ~1/C of one device's temporaries; the all-gather holds every key
    and 1/C of the queries' scores, ~1/C from C = 2 on (C = 1 is the plain attention)."""
    seq = 512 if attention == "ring" else 1024
    compiled = {c: _attention_step(attention, c, seq) for c in (1, 2, 4, 8)}
    temp = {c: step.memory_analysis().temp_size_in_bytes for c, step in compiled.items()}
    base = 1 if attention == "ring" else 2
    for c in (2, 4, 8):
        if c > base:
            assert temp[c] <= 1.2 * temp[base] * base / c, temp
    passes = {"ring": "collective-permute", "allgather": "all-gather"}[attention]
    assert passes in compiled[8].as_text()


def test_zigzag_order_puts_chunks_i_and_2c_minus_1_minus_i_on_device_i():
    order = zigzag_order(16, 4)  # 8 chunks of 2 tokens
    per_device = order.reshape(4, 2, 2)[:, :, 0] // 2  # each device's two chunks
    assert per_device.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert sorted(order.tolist()) == list(range(16))


def test_a_window_that_does_not_split_into_2c_chunks_is_a_usage_error():
    with pytest.raises(UsageError, match="multiple of 16"):
        zigzag_order(40, 8)


def test_an_unknown_context_attention_is_a_usage_error():
    with pytest.raises(UsageError, match="context_attention"):
        _cp("fsdp", "ulysses")


def test_context_parallelism_in_a_gpipe_pipeline_is_a_usage_error_naming_1f1b():
    with pytest.raises(UsageError, match="1f1b"):
        Trainer(lambda: Llama(CFG, rngs=nnx.Rngs(0)), optax.sgd(0.1), llama_loss,
                strategy=Pipeline(rules="dp", schedule="gpipe"), mesh="pipeline=2,context=4",
                devices=8)


@needs_devices(8)
def test_the_planner_plans_context_rows_with_the_rings_permutes_in_their_communication():
    """A batch of 2 windows does not split over 8 devices of data or fsdp; split over context
    it does, and the ring's collective-permutes are in the row's communication."""
    import io

    from jaxdist.plan import plan

    rows = plan("llama", ("test",), (8,), ("fsdp",), global_batch=2, pipeline_stages=(1,),
                overrides={"seq_len": 256}, context=(4, 8), progress=io.StringIO())
    by_mesh = {row.mesh: row for row in rows}
    assert by_mesh["fsdp=8"].skipped and by_mesh["data=2,fsdp=4"].skipped
    for mesh in ("fsdp=2,context=4", "fsdp=1,context=8"):
        row = by_mesh[mesh]
        assert row.fits and 0 < row.permute_bytes <= row.wire_bytes, row
