"""The GPT-style LM under every strategy and mesh trains as it does on one device."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from equivalence import assert_same_training, case_id, train_steps
from jaxdist import Pipeline, Trainer, UsageError
from jaxdist.models.lm import GPT, generate, lm_config, lm_eval, lm_loss, param_count

SEQ, BATCH, STEPS = 16, 16, 3
CFG = lm_config("test", seq_len=SEQ)


def _model():
    return GPT(CFG, rngs=nnx.Rngs(0))


def _batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (STEPS, BATCH, SEQ + 1), dtype=np.int32)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _train(strategy="dp", mesh=""):
    return train_steps(_model, lm_loss, _batches(), strategy=strategy, mesh=mesh, eval_fn=lm_eval)


@pytest.fixture(scope="module")
def one_device():
    return _train()


# the full list of strategies and meshes runs on the Llama model (tests/test_llama.py); the GPT
# keeps one of each kind: hybrid FSDP, sequence parallelism, GPipe, 1F1B and interleaved pipelines
CASES = [
    ("fsdp", "data=2,fsdp=4"),
    ("sp", "data=2,tensor=4"),
    ("dp", "data=2,pipeline=4"),  # a name on a pipelined mesh: Pipeline's default options
    (Pipeline(rules="fsdp_tp", schedule="1f1b"), "fsdp=2,pipeline=2,tensor=2"),
    (Pipeline(schedule="interleaved", virtual_stages=2), "data=4,pipeline=2"),
]


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", CASES, ids=[case_id(*case) for case in CASES])
def test_every_strategy_and_mesh_equals_one_device_after_three_steps(one_device, strategy, mesh):
    assert_same_training(_train(strategy, mesh), one_device)


@needs_devices(4)
def test_1f1b_equals_gpipe_equals_the_sequential_model_for_outputs_gradients_and_steps(
        one_device):
    batch = _batches()[0]
    model = _model()
    want_loss, want_grads = jax.value_and_grad(lambda m: lm_loss(m, batch)[0])(model)
    for schedule in ("gpipe", "1f1b"):
        trainer = Trainer(_model, optax.sgd(0.5), lm_loss, mesh="pipeline=4", devices=4,
                          strategy=Pipeline(microbatches=8, schedule=schedule), eval_fn=lm_eval)
        state = trainer.init()
        # outputs: evaluation runs the pipelined forward
        got = trainer.evaluate(state, [(*batch, np.ones(BATCH, np.float32))])
        np.testing.assert_allclose(got["loss"] / got["count"], float(want_loss), rtol=1e-5)
        # gradients: one SGD step of lr 0.5 moves the parameters by -0.5 * grads
        stepped, _ = trainer.step(state, trainer.shard_batch(batch))
        moved = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / -0.5,
                             nnx.state(trainer.sync_model(stepped), nnx.Param),
                             nnx.state(_model(), nnx.Param))
        for g, w in zip(jax.tree.leaves(moved), jax.tree.leaves(nnx.state(want_grads))):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
        assert_same_training(_train(Pipeline(schedule=schedule), "pipeline=4"), one_device)


def _pipeline_temp_bytes(schedule: str, microbatches: int, per_microbatch: int = 2) -> int:
    """Temporary bytes per device (activations live there) of the compiled train step on
    pipeline=4, from XLA's buffer assignment (`memory_analysis()`), for `microbatches`
    microbatches of `per_microbatch` sequences each."""
    trainer = Trainer(_model, optax.sgd(0.5), lm_loss, mesh="pipeline=4", devices=4,
                      strategy=Pipeline(microbatches=microbatches, schedule=schedule))
    tokens = jax.ShapeDtypeStruct((microbatches * per_microbatch, SEQ), jnp.int32,
                                  sharding=trainer.batch_sharding)
    compiled = trainer.lower(trainer.abstract_state(), (tokens, tokens)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@needs_devices(4)
def test_1f1b_holds_a_bounded_number_of_microbatches_activations_per_stage_in_the_compiled_step():
    """GPipe keeps every microbatch's activations for the backward pass, 1F1B those of at most
    2 S - 1 = 7: measured on the compiled step (temporaries, per device) with 8 and 32
    microbatches of the same size. Measured here: GPipe 1.99 -> 7.04 MB (+210 kB per
    microbatch), 1F1B 1.00 -> 1.21 MB (+8.45 kB: the microbatch's input and its gradient,
    2 x 4 kB, which any schedule holds for the whole batch)."""
    gpipe = {m: _pipeline_temp_bytes("gpipe", m) for m in (8, 32)}
    one_f = {m: _pipeline_temp_bytes("1f1b", m) for m in (8, 32)}
    micro_input = 2 * SEQ * CFG.embed * 4  # one microbatch's activation entering a stage
    gpipe_growth, one_f_growth = ((t[32] - t[8]) / 24 for t in (gpipe, one_f))
    assert one_f_growth <= 3 * micro_input, (gpipe, one_f)  # its input and gradient, no more
    assert gpipe_growth >= 10 * one_f_growth, (gpipe, one_f)
    assert one_f[32] < gpipe[8], (gpipe, one_f)  # 32 microbatches in less than GPipe's 8


@needs_devices(8)
def test_bad_pipeline_settings_are_clear_errors():
    with pytest.raises(UsageError, match="layers.* dimension 4 does not divide over mesh axes pipeline"):
        _train("dp", "pipeline=8")
    with pytest.raises(UsageError, match="schedule must be one of 'gpipe', '1f1b', 'interleaved', got 'zigzag'"):
        Pipeline(schedule="zigzag")
    with pytest.raises(UsageError, match="microbatch"):
        _train(Pipeline(microbatches=3), "pipeline=2,data=4")
    with pytest.raises(UsageError, match="Pipeline needs a mesh with pipeline > 1"):
        _train(Pipeline(), "data=8")


def test_the_model_sizes_span_one_million_to_seven_billion_parameters():
    counts = {size: param_count(lm_config(size)) for size in
              ("tiny", "125m", "350m", "1.3b", "7b")}
    assert 0.5e6 < counts["tiny"] < 2e6
    assert 110e6 < counts["125m"] < 170e6 and 300e6 < counts["350m"] < 420e6
    assert 1.2e9 < counts["1.3b"] < 1.5e9 and 6e9 < counts["7b"] < 7.5e9
    assert param_count(CFG) == sum(x.size for x in jax.tree.leaves(nnx.state(_model(),
                                                                             nnx.Param)))


def test_remat_policies_change_memory_not_results():
    """Memory: temporaries of the compiled loss-and-gradient step (activations kept for the
    backward pass live there). Measured here (test LM, batch 16 x 16 tokens): none 4.07 MB,
    dots 2.46, dots_no_batch 2.07, full 1.28."""
    batch = _batches()[0]
    results, temp = {}, {}
    for policy in ("none", "full", "dots", "dots_no_batch"):
        graphdef, params = nnx.split(GPT(lm_config("test", seq_len=SEQ, remat=policy),
                                         rngs=nnx.Rngs(0)))
        step = jax.jit(jax.value_and_grad(
            lambda p, b: lm_loss(nnx.merge(graphdef, p), b)[0]))  # noqa: B023 - called at once
        compiled = step.lower(params, batch).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
        loss, grads = compiled(params, batch)
        results[policy] = (float(loss), jax.tree.leaves(grads))
    for policy, (loss, grads) in results.items():
        assert loss == pytest.approx(results["none"][0], rel=1e-6), policy
        for g, w in zip(grads, results["none"][1]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    # saving fewer residuals needs less: everything > all dots > dots without a batch dim > none
    assert temp["full"] < temp["dots_no_batch"] < temp["dots"] < temp["none"], temp
    assert temp["full"] <= 0.5 * temp["none"], temp


@needs_devices(8)
@pytest.mark.parametrize("strategy,split", [("sp", True), ("tp", False)])
def test_sp_splits_the_residual_stream_along_seq_in_the_compiled_step(strategy, split):
    """On data=2,tensor=4 the residual stream (batch 16, seq 16, embed 32) is, per device,
    (8, 4, 32) under sp: batch over data, seq over tensor. The partitioned HLO of the compiled
    step holds arrays of that shape only if the `seq` rule really split the activations; tp,
    the same parameters without the rule, keeps (8, 16, 32) and never (8, 4, 32)."""
    trainer = Trainer(_model, optax.sgd(0.5), lm_loss, strategy=strategy, mesh="data=2,tensor=4",
                      devices=8)
    hlo = trainer.lower(trainer.init(), trainer.shard_batch(_batches()[0])).compile().as_text()
    seq_split = f"f32[{BATCH // 2},{SEQ // 4},{CFG.embed}]"
    whole_seq = f"f32[{BATCH // 2},{SEQ},{CFG.embed}]"
    assert (hlo.count(seq_split) >= 20) is split, (hlo.count(seq_split), hlo.count(whole_seq))
    if not split:
        assert hlo.count(seq_split) == 0 and hlo.count(whole_seq) >= 20


def test_generation_continues_a_prompt_with_bytes():
    out = generate(_model(), jnp.asarray(list(b"def "), jnp.int32), 8, jax.random.key(0))
    assert out.shape == (8,) and out.dtype == jnp.int32
    assert int(out.min()) >= 0 and int(out.max()) < 256
