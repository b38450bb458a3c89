"""Hugging Face Llama checkpoints: what transformers writes, jaxdist loads into any strategy's
shards and computes the same logits with; what jaxdist saves, transformers loads.

The reference is transformers itself (its own venv, see `hf_support`): random tiny
`LlamaForCausalLM`s saved with `save_pretrained`, their logits computed by it."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding
from safetensors.numpy import load_file, save_file

from conftest import needs_devices
from hf_support import transformers  # noqa: F401 - the fixture
from jaxdist import LocalSGD, Trainer, UsageError
from jaxdist.io.hf import hf_init_params, load_hf_config, load_hf_params, save_hf
from jaxdist.models.llama import Llama, RopeScaling, llama_config, llama_loss
from jaxdist.models.llama_hf import LLAMA_HF

TOLERANCE = 1e-4  # fp32 logits, jaxdist vs transformers
# grouped-query, untied, Llama 3's rope scaling (its original context shorter than the tokens,
# so every branch of the scaling is used)
GQA = llama_config("test", depth=2, kv_heads=2, rope_theta=500000.0,
                   rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))
# multi-query, tied embeddings, a head dimension other than embed / heads
MQA = llama_config("test", depth=3, kv_heads=1, head_dim=16, tied=True)
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)
ONE_DEVICE = SingleDeviceSharding(jax.devices()[0])


def _abstract_params(cfg):
    return nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _logits(cfg, params) -> np.ndarray:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, TOKENS))


def _load(path, cfg, shardings=ONE_DEVICE, dtype=None):
    like = _abstract_params(cfg)
    if dtype is not None:
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), like)
    return load_hf_params(path, like, shardings=shardings, cfg=cfg)


def _host(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def hf(transformers, tmp_path_factory):  # noqa: F811 - the fixture
    """transformers' checkpoints (one model per config; the sharded and bf16 copies hold the
    same draw) and its logits of TOKENS."""
    root = tmp_path_factory.mktemp("hf")
    np.save(root / "tokens.npy", TOKENS)
    gqa, mqa = GQA.to_hf(), MQA.to_hf()
    transformers.run([
        {"create": str(root / "gqa"), "config": gqa},
        {"create": str(root / "gqa-sharded"), "config": gqa, "max_shard_size": 20_000},
        {"create": str(root / "gqa-bf16"), "config": gqa, "dtype": "bfloat16"},
        {"create": str(root / "mqa"), "config": mqa},
        *({"logits": str(root / name), "tokens": str(root / "tokens.npy"),
           "out": str(root / f"{name}.npy")} for name in ("gqa", "mqa")),
    ])
    return root


@pytest.mark.parametrize("name,cfg", [("gqa", GQA), ("mqa", MQA)])
def test_logits_equal_transformers_for_gqa_untied_scaled_rope_and_for_mqa_tied(hf, name, cfg):
    assert load_hf_config(hf / name, seq_len=cfg.seq_len) == cfg  # as transformers wrote it
    params = _load(hf / name, cfg)
    want = np.load(hf / f"{name}.npy")
    assert np.abs(want).max() > 1.0  # far enough from zero for the tolerance to mean much
    assert _max_diff(_logits(cfg, params), want) < TOLERANCE


def _trainer(strategy, mesh, path, cfg=GQA):
    return Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(1)), optax.sgd(0.1), llama_loss,
                   strategy=strategy, mesh=mesh, devices=8,
                   init_params=hf_init_params(path, cfg=cfg))


@pytest.fixture(scope="module")
def fsdp_tp(hf):
    """A trainer on fsdp=4,tensor=2 whose state starts from the GQA checkpoint."""
    trainer = _trainer("fsdp_tp", "fsdp=4,tensor=2", hf / "gqa")
    return trainer, trainer.init()


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", [("fsdp", "fsdp=8"), ("fsdp_tp", "fsdp=4,tensor=2")])
def test_loaded_into_a_strategys_shards_the_logits_equal_one_devices(hf, fsdp_tp, strategy,
                                                                     mesh):
    if strategy == "fsdp_tp":
        trainer, state = fsdp_tp
    else:
        trainer = _trainer(strategy, mesh, hf / "gqa")
        state = trainer.init()
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainer.param_shardings)):
        assert got.sharding == want
    wq = state.params["layers"]["wq"][...]
    assert all(s.data.size < wq.size for s in wq.addressable_shards)  # never whole on a device
    one_device = _logits(GQA, _load(hf / "gqa", GQA))
    assert _max_diff(_logits(GQA, state.params), one_device) < 1e-5
    assert _max_diff(_logits(GQA, state.params), np.load(hf / "gqa.npy")) < TOLERANCE


def test_a_sharded_checkpoint_with_an_index_loads_the_same_weights(hf):
    assert (hf / "gqa-sharded" / "model.safetensors.index.json").is_file()
    assert len(list((hf / "gqa-sharded").glob("model-*.safetensors"))) > 1
    sharded, whole = _host(_load(hf / "gqa-sharded", GQA)), _host(_load(hf / "gqa", GQA))
    for name in whole:
        np.testing.assert_array_equal(sharded[name], whole[name])


def test_a_bf16_checkpoint_loads_as_its_values_in_float32_and_in_bfloat16(hf):
    want = {k: x.astype(ml_dtypes.bfloat16) for k, x in _host(_load(hf / "gqa", GQA)).items()}
    as_f32 = _host(_load(hf / "gqa-bf16", GQA))
    as_bf16 = _host(_load(hf / "gqa-bf16", GQA, dtype=jnp.bfloat16))
    for name in want:
        assert as_f32[name].dtype == np.float32 and as_bf16[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(as_f32[name], want[name].astype(np.float32))
        np.testing.assert_array_equal(as_bf16[name].view(np.uint16), want[name].view(np.uint16))


@needs_devices(8)
def test_saved_from_fsdp_tp_transformers_loads_it_with_the_same_logits(hf, fsdp_tp, tmp_path,
                                                                       transformers):  # noqa: F811
    trainer, state = fsdp_tp
    save_hf(tmp_path / "gqa", trainer.canonical(state), GQA, max_shard_bytes=30_000)
    assert (tmp_path / "gqa" / "model.safetensors.index.json").is_file()
    mqa_trainer = _trainer("fsdp_tp", "fsdp=4,tensor=2", hf / "mqa", MQA)
    save_hf(tmp_path / "mqa", mqa_trainer.canonical(mqa_trainer.init()), MQA)
    assert "lm_head.weight" not in load_file(tmp_path / "mqa" / "model.safetensors")  # tied
    np.save(tmp_path / "tokens.npy", TOKENS)
    transformers.run([{"logits": str(tmp_path / name), "tokens": str(tmp_path / "tokens.npy"),
                       "out": str(tmp_path / f"{name}.npy")} for name in ("gqa", "mqa")])
    for name, cfg in (("gqa", GQA), ("mqa", MQA)):
        jaxdist = _logits(cfg, _load(hf / name, cfg))
        assert _max_diff(np.load(tmp_path / f"{name}.npy"), jaxdist) < TOLERANCE


@needs_devices(8)
def test_loaded_trained_five_steps_under_fsdp_tp_and_saved_transformers_gives_its_logits(
        hf, fsdp_tp, tmp_path, transformers):  # noqa: F811
    trainer, state = fsdp_tp
    state = jax.tree.map(jnp.copy, state)  # the step donates it; the fixture's stays
    rng = np.random.default_rng(1)
    for _ in range(5):
        tokens = rng.integers(0, GQA.vocab, (8, 17)).astype(np.int32)
        state, _ = trainer.step(state, (tokens[:, :-1], tokens[:, 1:]))
    trained = _logits(GQA, state.params)
    assert _max_diff(trained, np.load(hf / "gqa.npy")) > 100 * TOLERANCE  # it did learn
    save_hf(tmp_path / "trained", trainer.canonical(state), GQA)
    np.save(tmp_path / "tokens.npy", TOKENS)
    transformers.run([{"logits": str(tmp_path / "trained"), "tokens": str(tmp_path / "tokens.npy"),
                       "out": str(tmp_path / "trained.npy")}])
    assert _max_diff(np.load(tmp_path / "trained.npy"), trained) < TOLERANCE


@pytest.mark.slow  # a BPE, the corpus and a pipeline-free fsdp_tp run: ~1-2 min
@needs_devices(8)
def test_the_lm_experiment_fine_tunes_an_hf_checkpoint_and_saves_what_transformers_loads(
        transformers, tmp_path, tmp_path_factory):  # noqa: F811
    from runs import Run

    cfg = llama_config("test", vocab=512)
    transformers.run([{"create": str(tmp_path / "start"), "config": cfg.to_hf()}])
    cache = {"JAXDIST_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}
    code, log = Run(["--model", "llama", "--config", "smoke", "--init_from", str(tmp_path / "start"),
                     "--vocab", "512", "--max_steps", "4", "--strategy", "fsdp_tp",
                     "--mesh", "fsdp=4,tensor=2", "--sample_bytes", "0",
                     "--save_hf", str(tmp_path / "tuned")], module="experiments.lm",
                    env=cache).finish()
    assert code == 0, log[-3000:]
    assert f"training the Llama from {tmp_path / 'start'}" in log
    assert (tmp_path / "tuned" / "tokenizer.json").exists()
    start, tuned = (_load(tmp_path / name, cfg) for name in ("start", "tuned"))
    assert _max_diff(_logits(cfg, tuned), _logits(cfg, start)) > 100 * TOLERANCE  # it trained
    np.save(tmp_path / "tokens.npy", TOKENS)
    transformers.run([{"logits": str(tmp_path / "tuned"), "tokens": str(tmp_path / "tokens.npy"),
                       "out": str(tmp_path / "tuned.npy")}])
    assert _max_diff(np.load(tmp_path / "tuned.npy"), _logits(cfg, tuned)) < TOLERANCE


@pytest.mark.parametrize("inner", [False, True])
def test_any_block_of_a_parameter_reads_from_its_hf_tensor(inner):
    """The windows of rows and columns read for a device's block, head features split too."""
    spec, shape = LLAMA_HF["layers/wo"], (4, 8, 6)  # (heads, dim, embed) <- (embed, heads*dim)
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    tensor = spec.to_hf(x)
    assert tensor.shape == (6, 32)
    index = (slice(1, 3), slice(2, 6) if inner else slice(0, 8), slice(3, 6))
    window, finish = spec.window(index, shape)
    np.testing.assert_array_equal(finish(tensor[window]), x[index])


# -- bad input: one line naming what is wrong, before any data is read


@pytest.fixture
def saved(tmp_path):
    cfg, rng = llama_config("test", depth=2), np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          _abstract_params(cfg))  # host arrays save as well
    return save_hf(tmp_path / "ckpt", params, cfg), cfg


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _one_line_error(path, cfg, match: str) -> str:
    with pytest.raises(UsageError, match=match) as error:
        _load(path, cfg)
    assert "\n" not in str(error.value)
    return str(error.value)


def _model_holding(cfg, value: float) -> Llama:
    """A Llama whose every weight is `value` (made without drawing any)."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: np.full(x.shape, value, np.float32),
                                   nnx.state(model, nnx.Param)))
    return model


@needs_devices(4)
@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "local_sgd"])
def test_init_params_start_the_replicated_layouts_from_the_checkpoint(saved, strategy):
    path, cfg = saved
    trainer = Trainer(_model_holding(cfg, 0.0), optax.adam(1e-3), llama_loss,
                      strategy=strategy, devices=4, init_params=hf_init_params(path, cfg=cfg))
    got = _host(trainer.canonical(trainer.init()).params)
    for name, want in _host(_load(path, cfg)).items():
        np.testing.assert_array_equal(got[name], want)


def test_init_params_refuse_a_strategy_whose_reducer_state_comes_from_the_weights(saved):
    path, cfg = saved
    trainer = Trainer(_model_holding(cfg, 0.0), optax.sgd(0.1), llama_loss, devices=2,
                      strategy=LocalSGD(every=2, outer=optax.sgd(0.7)),
                      init_params=hf_init_params(path, cfg=cfg))
    with pytest.raises(UsageError, match="gradient-reducer state made from the model's weights"):
        trainer.init()


def test_a_missing_tensor_fails_naming_it(saved):
    path, cfg = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _one_line_error(path, cfg, r"no tensor model\.layers\.1\.mlp\.up_proj\.weight")


def test_a_tensor_of_another_shape_fails_naming_it_and_both_shapes(saved):
    path, cfg = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                       np.zeros((8, 32), np.float32)}))
    message = _one_line_error(path, cfg, r"model\.layers\.0\.self_attn\.k_proj\.weight")
    assert "(8, 32)" in message and "(16, 32)" in message


def test_a_config_json_that_disagrees_with_the_model_fails_naming_the_field(saved):
    path, cfg = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    _one_line_error(path, cfg, r"num_key_value_heads is 4 but the model's kv_heads is 2")
    with pytest.raises(UsageError, match=r"layers/wk as \(2, 32, 4, 8\), the parameters have "
                                         r"\(2, 32, 2, 8\)"):
        load_hf_params(path, _abstract_params(cfg), shardings=ONE_DEVICE)  # no cfg: shapes


def test_a_directory_without_a_checkpoint_fails_naming_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint directory"):
        load_hf_config(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="has no config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(llama_config("test").to_hf()))
    with pytest.raises(UsageError, match="has neither model.safetensors nor"):
        _load(tmp_path, llama_config("test"))
