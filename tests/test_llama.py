"""The Llama model (grouped-query attention, packed documents) under every strategy and mesh
trains as it does on one device; documents do not see each other; padding costs nothing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import needs_devices
from equivalence import assert_same_training, case_id, packed_document_batches, train_steps
from jaxdist import Pipeline, UsageError
from jaxdist.models.llama import (LLAMA_SIZES, Llama, LlamaConfig, document_positions,
                                  llama_config, llama_eval, llama_loss, param_count)

SEQ, BATCH, STEPS = 16, 16, 3
CFG = llama_config("test", seq_len=SEQ)  # 4 query heads sharing 2 key/value heads


def _batches():
    return packed_document_batches(CFG.vocab, steps=STEPS, batch=BATCH, seq=SEQ, cuts=(0, 4))


def _train(strategy="dp", mesh="", cfg=CFG):
    return train_steps(lambda: Llama(cfg, rngs=nnx.Rngs(0)), llama_loss, _batches(),
                       strategy=strategy, mesh=mesh, eval_fn=llama_eval)


@pytest.fixture(scope="module")
def one_device():
    return _train()


CASES = [
    ("shard_map", "data=8"),
    ("fsdp", "data=2,fsdp=4"),
    ("tp", "data=4,tensor=2"),
    ("sp", "data=2,tensor=4"),
    (Pipeline(rules="fsdp_tp", schedule="1f1b"), "fsdp=2,pipeline=2,tensor=2"),
    (Pipeline(rules="sp", microbatches=2), "data=2,pipeline=2,tensor=2"),
]
# the rest of the strategies and meshes: the slow tier (CI runs both)
MORE_CASES = [
    ("dp", "data=8"),
    ("zero1", "data=8"),
    ("fsdp", "fsdp=8"),
    ("fsdp_tp", "fsdp=4,tensor=2"),
    ("dp", "data=2,pipeline=4"),  # a name on a pipelined mesh: Pipeline's default options
    (Pipeline(rules="fsdp", schedule="gpipe", microbatches=4), "fsdp=2,pipeline=2,data=2"),
]


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", [
    *(pytest.param(*case, id=case_id(*case)) for case in CASES),
    *(pytest.param(*case, id=case_id(*case), marks=pytest.mark.slow) for case in MORE_CASES)])
def test_every_strategy_and_mesh_equals_one_device_for_llama_with_gqa_and_packed_documents(
        one_device, strategy, mesh):
    assert_same_training(_train(strategy, mesh), one_device)


@needs_devices(4)
def test_multi_query_attention_under_tensor_parallelism_equals_one_device():
    mqa = dataclasses.replace(CFG, kv_heads=1)  # one key/value head: replicated over tensor
    assert_same_training(_train("tp", "data=2,tensor=2", mqa), _train(cfg=mqa))


def test_a_tokens_logits_do_not_change_when_another_document_in_its_window_changes():
    model = Llama(CFG, rngs=nnx.Rngs(1))
    segments = jnp.asarray([[1] * 5 + [2] * 7 + [3] * 4])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab, (1, SEQ)))
    other = tokens.at[0, :5].set((tokens[0, :5] + 7) % CFG.vocab)  # document 1 changes
    other = other.at[0, 12:].set((other[0, 12:] + 3) % CFG.vocab)  # and document 3
    before, after = model(tokens, segments), model(other, segments)
    np.testing.assert_allclose(after[0, 5:12], before[0, 5:12], atol=1e-5)
    assert not np.allclose(after[0, :5], before[0, :5], atol=1e-3)
    # one document alone in its row gives the same logits: positions restart per document
    alone = model(tokens[:, 5:12])
    np.testing.assert_allclose(before[0, 5:12], alone[0], atol=1e-5)
    # without segment ids the window is one document, and document 2 sees document 1
    assert not np.allclose(model(other)[0, 5:12], model(tokens)[0, 5:12], atol=1e-3)


def test_unrolled_layers_equal_the_scanned_stack_in_loss_and_gradients():
    batch = _batches()[0]

    def loss_and_grads(unroll):
        model = Llama(dataclasses.replace(CFG, unroll=unroll), rngs=nnx.Rngs(0))
        return nnx.value_and_grad(lambda m: llama_loss(m, batch)[0])(model)

    (loss, grads), (loss2, grads2) = loss_and_grads(False), loss_and_grads(True)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(g2, g, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_weights_and_stays_close_to_float32():
    batch = _batches()[0]

    def loss_and_grads(dtype):
        model = Llama(dataclasses.replace(CFG, compute_dtype=dtype), rngs=nnx.Rngs(0))
        return model, *nnx.value_and_grad(lambda m: llama_loss(m, batch)[0])(model)

    _, loss, grads = loss_and_grads("float32")
    model, loss16, grads16 = loss_and_grads("bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert loss16.dtype == jnp.float32 and loss16 != loss  # it did compute in bfloat16
    np.testing.assert_allclose(loss16, loss, rtol=1e-2)
    for g, g16 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads16)):
        assert np.linalg.norm(g16 - g) <= 0.05 * np.linalg.norm(g) + 1e-6


def test_document_positions_restart_at_every_document():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1] * 8])
    np.testing.assert_array_equal(document_positions(segments),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_padding_is_ignored_by_the_loss_and_its_gradient():
    model = Llama(CFG, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CFG.vocab, (2, SEQ + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
    segments = np.ones((2, SEQ), np.int32)
    segments[1, 10:], targets[1, 10:] = 0, -1  # the last 6 places of row 1 are padding

    def loss_and_grads(inputs):
        return nnx.value_and_grad(lambda m: llama_loss(m, (inputs, targets, segments))[0])(model)

    loss, grads = loss_and_grads(inputs)
    padded = inputs.copy()
    padded[1, 10:] = (padded[1, 10:] + 5) % CFG.vocab  # what the padding holds does not matter
    loss2, grads2 = loss_and_grads(padded)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(g2, g, rtol=1e-5, atol=1e-7)
    # the loss is the mean over the 26 real targets
    logits = model(inputs, segments)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    real = targets >= 0
    picked = np.take_along_axis(np.asarray(log_probs), np.maximum(targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, -picked[real].mean(), rtol=1e-5)
    # evaluation sums the same tokens and counts them
    sums = llama_eval(model, (inputs, targets, segments, np.ones(2, np.float32)))
    assert float(sums["count"]) == real.sum()
    np.testing.assert_allclose(sums["loss"] / sums["count"], loss, rtol=1e-5)


@pytest.mark.parametrize("size", [s for s, c in LLAMA_SIZES.items() if c.moe is None])
def test_every_dense_size_round_trips_through_hf_config_json(size):
    cfg = llama_config(size)
    assert LlamaConfig.from_hf(cfg.to_hf(), seq_len=cfg.seq_len, unroll=cfg.unroll) == cfg
    assert cfg.to_hf()["num_key_value_heads"] == cfg.kv_heads


def test_the_published_shapes_have_the_published_parameter_counts():
    billions = {size: round(param_count(llama_config(size)) / 1e9, 2)
                for size in ("3.2-1b", "3.1-8b", "3.1-70b", "qwen2.5-7b", "mistral-7b")}
    assert billions == {"3.2-1b": 1.24, "3.1-8b": 8.03, "3.1-70b": 70.55, "qwen2.5-7b": 7.62,
                        "mistral-7b": 7.24}


def test_bad_shapes_and_hf_configs_are_one_line_errors():
    for bad in (dict(kv_heads=3), dict(embed=30), dict(remat="most"),
                dict(compute_dtype="float16")):
        with pytest.raises(UsageError) as err:
            llama_config("test", **bad)
        assert "\n" not in str(err.value)
    hf = llama_config("test").to_hf()
    for change, words in (({"model_type": "gpt2"}, "not a Llama"),
                          ({"attention_bias": True}, "biases"),
                          ({"hidden_act": "gelu"}, "silu"),
                          ({"rope_parameters": {"rope_type": "yarn"}}, "yarn")):
        with pytest.raises(UsageError, match=words):
            LlamaConfig.from_hf({**hf, **change})
    with pytest.raises(UsageError, match="hidden_size"):
        LlamaConfig.from_hf({k: v for k, v in hf.items() if k != "hidden_size"})
