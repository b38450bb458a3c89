"""The mixture-of-experts Llama: routing, both dispatches and the auxiliary losses equal a direct
per-token computation in numpy, and expert parallelism (`ep`) trains as one device does."""

from __future__ import annotations

import dataclasses
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from equivalence import assert_same_training, mesh_devices
from jaxdist import Pipeline, Trainer, UsageError
from jaxdist.models.llama import (Llama, llama_config, llama_eval, llama_loss, llama_moe_stats,
                                  param_count, train_flops)
from jaxdist.models.moe import (MoEConfig, capacity, capacity_slots, dropless_all_to_all,
                                moe_mlp, route)
from jaxdist.observe import ideal_all_to_all_bytes
from jaxdist.observe.plots import plot_runs
from jaxdist.observe.writer import MetricsWriter, read_records
from jaxdist.parallel.backends import host_metrics
from jaxdist.io import read_checkpoint_arrays
from jaxdist.plan.analysis import analyze_step
from runs import STEP_EVENTS, Run

SEQ, BATCH, STEPS = 16, 16, 3
MOE = MoEConfig(num_experts=8, top_k=2, expert_mlp=32, shared_experts=1, aux_loss_weight=0.1,
                z_loss_weight=0.01)
CFG = llama_config("test", seq_len=SEQ, moe=MOE)


def _batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab, (STEPS, BATCH, SEQ + 1), dtype=np.int32)
    segments = np.ones((BATCH, SEQ), np.int32)
    segments[:, SEQ // 2:] = 2  # two documents per row
    return [(t[:, :-1], t[:, 1:], segments) for t in tokens]


def _trainer(strategy="dp", mesh="", cfg=CFG):
    return Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(0)), optax.sgd(0.5), llama_loss,
                   strategy=strategy, mesh=mesh or None, devices=mesh_devices(mesh),
                   eval_fn=llama_eval)


ROUTER_METRICS = ("cross_entropy", "moe_aux_loss", "moe_z_loss", "moe_dropped")


def _train(strategy="dp", mesh="", cfg=CFG):
    """(losses, final parameters) after STEPS plain-SGD steps (as `equivalence.train_steps`),
    the router metrics of each step, and the trainer."""
    trainer = _trainer(strategy, mesh, cfg)
    state = trainer.init()
    metrics = []
    for batch in _batches():
        state, m = trainer.step(state, trainer.shard_batch(batch))
        metrics.append({k: float(v) for k, v in m.items()})
    params = jax.tree.map(np.asarray, nnx.state(trainer.sync_model(state), nnx.Param))
    return (np.asarray([m["loss"] for m in metrics]), params), metrics, trainer


def _assert_equal(got, want):
    assert_same_training(got[0], want[0])
    for name in ROUTER_METRICS:
        np.testing.assert_allclose([m[name] for m in got[1]], [m[name] for m in want[1]],
                                   rtol=1e-5, atol=1e-7, err_msg=name)


def _spec(trainer, name):
    return next(tuple(s.spec) for path, s in
                jax.tree_util.tree_flatten_with_path(trainer.param_shardings)[0]
                if name in jax.tree_util.keystr(path))


CAPACITY = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, dispatch="capacity",
                                                            capacity_factor=0.75))


@pytest.fixture(scope="module")
def one_device():
    return {"dropless": _train(), "capacity": _train(cfg=CAPACITY)}


@needs_devices(8)
@pytest.mark.parametrize("dispatch,mesh", [
    ("dropless", "expert=8"), ("dropless", "data=2,expert=4"), ("dropless", "fsdp=2,expert=4"),
    ("capacity", "fsdp=2,expert=4")])
def test_expert_parallelism_trains_as_one_device(one_device, dispatch, mesh):
    got = _train("ep", mesh, CFG if dispatch == "dropless" else CAPACITY)
    _assert_equal(got, one_device[dispatch])
    trainer = got[2]
    fsdp = "fsdp" if trainer.mesh.shape["fsdp"] > 1 else None
    # each device holds its experts (and, with fsdp, a slice of their embedding dimension)
    assert _spec(trainer, "expert_gate") == (None, "expert", fsdp, None)
    batch_axes = trainer.batch_sharding.spec[0]  # the batch over every axis of the mesh
    assert math.prod(trainer.mesh.shape[a] for a in np.atleast_1d(batch_axes)) == 8
    if dispatch == "capacity":  # the tokens over capacity are dropped, the same on every mesh
        assert all(m["moe_dropped"] > 0 for m in got[1])
    else:
        assert all(m["moe_dropped"] == 0 for m in got[1])


ALL_TO_ALL = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, exchange="all_to_all",
                                                              exchange_capacity=4.0))


@needs_devices(8)
@pytest.mark.parametrize("mesh", ["expert=8", "data=2,expert=4",
                                  pytest.param("fsdp=2,expert=4", marks=pytest.mark.slow)])
def test_the_all_to_all_exchange_trains_as_one_device_when_it_drops_nothing(one_device, mesh):
    got = _train("ep", mesh, ALL_TO_ALL)
    assert all(m["moe_dropped"] == 0 for m in got[1])  # its buffers had room for every token
    _assert_equal(got, one_device["dropless"])


@needs_devices(8)
def test_the_all_to_all_exchange_moves_its_buffers_the_ideal_bytes_at_capacity_one():
    # each device sends tokens * top_k rows per direction; capacity 1: buffers of exactly that
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, exchange="all_to_all",
                                                           exchange_capacity=1.0))
    ledger = analyze_step(_trainer("ep", "expert=8", cfg), _batches()[0]).ledger
    tokens, group = BATCH * SEQ // 8, 8
    ideal = ideal_all_to_all_bytes(tokens, 2, CFG.embed, 4, group)  # float32 on the wire
    ids = tokens * 2 * 4 * (group - 1) / group  # each row's expert id, forward only
    # per layer: dispatch and combine, forward and backward
    assert ledger.total("all-to-all", wire=True) == pytest.approx(CFG.depth * (4 * ideal + ids))
    gathered = analyze_step(_trainer("ep", "expert=8"), _batches()[0]).ledger
    assert gathered.count("all-to-all") == 0
    assert ledger.total(wire=True) < gathered.total(wire=True)


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", [("fsdp", "fsdp=8"), ("tp", "data=2,tensor=4")])
def test_the_mixture_of_experts_trains_as_one_device_under_fsdp_and_tensor_parallelism(
        one_device, strategy, mesh):
    _assert_equal(_train(strategy, mesh), one_device["dropless"])


@needs_devices(8)
def test_bfloat16_compute_under_expert_parallelism_stays_close_to_float32(one_device):
    bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
    (losses, params), _, _ = _train("ep", "data=2,expert=4", bf16)
    (want, want_params), _, _ = one_device["dropless"]
    np.testing.assert_allclose(losses, want, rtol=1e-2)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1 + np.exp(-x))


def _reference_moe(moe, p, x, slots=None):
    """The MoE MLP one token at a time: its top-k experts in rank order, each taking the token
    while it has fewer than `slots` (None: no limit); (output, dropped fraction, expert load)."""
    e_count, k = moe.num_experts, moe.top_k
    logits = x @ p["router"]
    scores = _softmax(logits) if moe.router == "softmax" else 1 / (1 + np.exp(-logits))
    taken = np.zeros(e_count, int)
    chosen_count = np.zeros(e_count)
    y = np.zeros_like(x)
    dropped = 0
    for t in range(len(x)):
        chosen = np.argsort(-scores[t], kind="stable")[:k]
        weights = scores[t, chosen] / scores[t, chosen].sum()
        for ex, w in zip(chosen, weights):
            chosen_count[ex] += 1
            if slots is not None and taken[ex] >= slots:
                dropped += 1
                continue
            taken[ex] += 1
            h = _silu(x[t] @ p["expert_gate"][ex]) * (x[t] @ p["expert_up"][ex])
            y[t] += w * (h @ p["expert_down"][ex])
        if moe.shared_experts:
            h = _silu(x[t] @ p["shared_gate"]) * (x[t] @ p["shared_up"])
            y[t] += h @ p["shared_down"]
    return y, dropped / (len(x) * k), chosen_count / (len(x) * k)


def _one_layer(moe, seed=0, tokens=24, embed=16):
    """One layer's MoE parameters and activations (1, tokens, embed), in float32."""
    model = Llama(llama_config("test", embed=embed, heads=2, kv_heads=1, depth=1, moe=moe),
                  rngs=nnx.Rngs(seed))
    p = {name: np.asarray(w[0]) * 10 for name, w in model.layers.stacked().items()}  # sharper
    x = np.random.default_rng(seed).normal(size=(1, tokens, embed)).astype(np.float32)
    return p, x


@pytest.mark.parametrize("moe", [
    MoEConfig(num_experts=4, top_k=2, expert_mlp=8),
    MoEConfig(num_experts=4, top_k=1, expert_mlp=8, shared_experts=2, router="sigmoid"),
], ids=["softmax-top2", "sigmoid-top1-shared"])
def test_dropless_routes_every_token_to_its_top_k_experts_like_a_per_token_loop(moe):
    p, x = _one_layer(moe)
    y, stats = jax.jit(lambda p, x: moe_mlp(moe, p, x))(p, x)
    want, dropped, load = _reference_moe(moe, {k: v.astype(np.float64) for k, v in p.items()},
                                         x[0].astype(np.float64))
    np.testing.assert_allclose(y[0], want, rtol=1e-4, atol=1e-5)
    assert float(stats.dropped) == dropped == 0
    np.testing.assert_allclose(stats.load, load, rtol=1e-6)


def test_capacity_drops_the_assignments_past_each_experts_capacity_in_token_order():
    moe = MoEConfig(num_experts=4, top_k=2, expert_mlp=8, shared_experts=1,
                    dispatch="capacity", capacity_factor=0.5)
    p, x = _one_layer(moe, seed=1)
    slots = capacity(moe, x.shape[1])
    assert slots == math.ceil(0.5 * 24 * 2 / 4) == 6
    y, stats = jax.jit(lambda p, x: moe_mlp(moe, p, x))(p, x)
    want, dropped, load = _reference_moe(moe, {k: v.astype(np.float64) for k, v in p.items()},
                                         x[0].astype(np.float64), slots)
    assert dropped >= 0.4  # at most 4 x 6 of the 48 assignments fit
    np.testing.assert_allclose(float(stats.dropped), dropped, rtol=1e-6)
    np.testing.assert_allclose(stats.load, load, rtol=1e-6)  # the load is counted before drops
    np.testing.assert_allclose(y[0], want, rtol=1e-4, atol=1e-5)


@needs_devices(8)
def test_the_all_to_all_exchange_drops_what_overflows_a_buffer_in_token_order_per_device():
    moe = MoEConfig(num_experts=8, top_k=2, expert_mlp=8, exchange="all_to_all",
                    exchange_capacity=0.5)  # 8 tokens a device: 16 assignments, 1 slot each
    p, x = _one_layer(moe, tokens=64)
    p = {k: v for k, v in p.items() if k.startswith(("router", "expert_"))}
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    y, dropped = jax.jit(lambda x, p: dropless_all_to_all(
        moe, x, route(moe, x @ p["router"]), p, mesh, jax.P("expert", None)))(x[0], p)
    want, lost = np.zeros_like(x[0], np.float64), 0
    for device in range(8):  # each sends its tokens' choices in order; one per destination
        rows = x[0, device * 8:(device + 1) * 8].astype(np.float64)
        scores = _softmax(rows @ p["router"])
        sent = set()
        for t, row in enumerate(rows):
            chosen = np.argsort(-scores[t], kind="stable")[:2]
            for ex, w in zip(chosen, scores[t, chosen] / scores[t, chosen].sum()):
                if ex in sent:  # expert ex is alone on device ex: its slot is taken
                    lost += 1
                    continue
                sent.add(ex)
                h = _silu(row @ p["expert_gate"][ex]) * (row @ p["expert_up"][ex])
                want[device * 8 + t] += w * (h @ p["expert_down"][ex])
    assert lost > 0
    np.testing.assert_allclose(float(dropped), lost / 128, rtol=1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def _every_expert_on_every_token(moe, p, h):
    """The MoE MLP without a dispatch: every expert computes every token, the output mixes the
    kept choices (jax, so that it has gradients)."""
    x = h.reshape(-1, h.shape[-1])
    routing = route(moe, x @ p["router"])
    _, kept = capacity_slots(routing.experts, moe.num_experts,
                             capacity(moe, len(x)) if moe.dispatch == "capacity" else len(x))
    hidden = jax.nn.silu(jnp.einsum("te,xef->txf", x, p["expert_gate"])) * jnp.einsum(
        "te,xef->txf", x, p["expert_up"])
    out = jnp.einsum("txf,xfe->txe", hidden, p["expert_down"])
    mix = jax.nn.one_hot(routing.experts, moe.num_experts) * (
        routing.weights * kept.reshape(routing.weights.shape))[..., None]
    return jnp.einsum("tkx,txe->te", mix, out).reshape(h.shape)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_both_dispatches_have_the_gradients_of_every_expert_on_every_token(dispatch):
    # a regression test: XLA:CPU with oneDNN matmuls got the batched SwiGLU's gradient wrong
    moe = MoEConfig(num_experts=8, top_k=2, expert_mlp=32, dispatch=dispatch,
                    capacity_factor=0.75)
    p, _ = _one_layer(moe, embed=32)
    p = {k: p[k] for k in ("router", "expert_gate", "expert_up", "expert_down")}
    x = np.random.default_rng(1).normal(size=(16, 16, 32)).astype(np.float32)
    r = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(moe_mlp(moe, p, x)[0] * r), (0, 1)))(p, x)
    want = jax.grad(lambda p, x: jnp.sum(_every_expert_on_every_token(moe, p, x) * r),
                    (0, 1))(p, x)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_aux_and_z_losses_equal_their_formulas(router):
    moe = MoEConfig(num_experts=4, top_k=2, expert_mlp=8, router=router)
    p, x = _one_layer(moe, seed=2)
    _, stats = moe_mlp(moe, p, x)
    logits = x[0].astype(np.float64) @ p["router"]
    scores = _softmax(logits) if router == "softmax" else 1 / (1 + np.exp(-logits))
    probs = scores / scores.sum(-1, keepdims=True)
    top2 = np.argsort(-scores, axis=-1, kind="stable")[:, :2]
    f = np.bincount(top2.reshape(-1), minlength=4) / top2.size  # share of assignments
    np.testing.assert_allclose(stats.aux, 4 * np.sum(f * probs.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(stats.z, np.mean(lse ** 2), rtol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_the_top_k_weights_are_the_chosen_scores_normalised_to_sum_to_one(router):
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(32, 8)) * 3, jnp.float32)
    routing = route(MoEConfig(num_experts=8, top_k=3, router=router), logits)
    np.testing.assert_allclose(routing.weights.sum(-1), 1.0, rtol=1e-6)
    scores = jax.nn.softmax(logits) if router == "softmax" else jax.nn.sigmoid(logits)
    chosen = np.take_along_axis(np.asarray(scores), np.asarray(routing.experts), -1)
    assert (chosen.min(-1) >= np.sort(np.asarray(scores), -1)[:, -3]).all()  # the top 3
    np.testing.assert_allclose(routing.weights, chosen / chosen.sum(-1, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_allclose(routing.probs.sum(-1), 1.0, rtol=1e-6)


def test_the_loss_is_cross_entropy_plus_the_weighted_layer_means_of_the_aux_losses():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    batch = _batches()[0]
    loss, metrics = llama_loss(model, batch)
    stats = llama_moe_stats(model, batch)
    assert stats.load.shape == (CFG.depth, 8) and stats.dropped.shape == (CFG.depth,)
    np.testing.assert_allclose(stats.load.sum(-1), 1.0, rtol=1e-6)  # per layer: shares
    np.testing.assert_allclose(metrics["moe_aux_loss"], stats.aux / CFG.depth, rtol=1e-6)
    np.testing.assert_allclose(metrics["moe_z_loss"], stats.z / CFG.depth, rtol=1e-6)
    np.testing.assert_allclose(metrics["moe_max_load"], 8 * stats.load.max(), rtol=1e-6)
    np.testing.assert_allclose(
        loss, metrics["cross_entropy"] + 0.1 * metrics["moe_aux_loss"]
        + 0.01 * metrics["moe_z_loss"], rtol=1e-6)
    # the router learns from the auxiliary losses too
    grads = nnx.grad(lambda m: llama_loss(m, batch)[0])(model)
    assert np.abs(np.asarray(jax.tree.leaves(grads["layers"]["router"])[0])).max() > 0


def test_param_count_is_the_models_size_and_a_token_uses_its_top_k_and_shared_experts():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    sizes = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert param_count(CFG) == sizes
    # one token uses 2 of the 8 experts and the shared one: 3 of 9 expert MLPs
    experts = CFG.depth * 3 * CFG.embed * 32
    assert param_count(CFG) - param_count(CFG, active=True) == 6 * experts
    dense = llama_config("test", seq_len=SEQ)
    assert param_count(dense, active=True) == param_count(dense)
    assert train_flops(CFG, 1) < train_flops(dataclasses.replace(CFG, moe=dataclasses.replace(
        MOE, top_k=8)), 1)


@pytest.mark.parametrize("bad,words", [
    (dict(num_experts=0), "num_experts"), (dict(top_k=0), "top_k"), (dict(top_k=9), "top_k"),
    (dict(router="relu"), "router"), (dict(dispatch="tokens"), "dispatch"),
    (dict(capacity_factor=0.0), "capacity_factor"), (dict(aux_loss_weight=-1.0), "weight"),
    (dict(shared_experts=-1), "shared_experts"), (dict(exchange="ring"), "exchange"),
    (dict(exchange_capacity=-1.0), "exchange_capacity"),
])
def test_bad_moe_configs_are_one_line_errors(bad, words):
    with pytest.raises(UsageError, match=words) as err:
        llama_config("test", moe=dataclasses.replace(MOE, **bad))
    assert "\n" not in str(err.value)


@needs_devices(8)
def test_experts_that_do_not_divide_over_the_expert_axis_or_a_pipeline_are_clear_errors():
    four = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, num_experts=4))
    with pytest.raises(UsageError, match=r"expert_\w+ of shape \(4, 4, .* does not divide"):
        _trainer("ep", "expert=8", four)
    trainer = _trainer(Pipeline(rules="fsdp"), "fsdp=2,pipeline=2")
    with pytest.raises(UsageError, match="does not run in a pipeline"):
        trainer.step(trainer.init(), trainer.shard_batch(_batches()[0]))
    with pytest.raises(UsageError, match="no HF"):
        CFG.to_hf()


def test_the_lm_experiments_flags_make_a_mixture_of_experts_llama():
    from experiments import lm

    cfg = dataclasses.replace(lm.get_config("smoke"), model="llama", moe_experts=4, moe_top_k=1)
    assert lm.model_variant(cfg).config.moe == MoEConfig(num_experts=4, top_k=1)
    for change, words in ((dict(model="gpt"), "--moe_experts: options of --model llama"),
                          (dict(save_hf="out"), "dense Llama"),
                          (dict(moe_experts=-1), "--moe_experts -1")):
        with pytest.raises(UsageError, match=words):
            lm._check_llama_flags(dataclasses.replace(cfg, **change))
    with pytest.raises(UsageError, match="top_k"):
        lm.model_variant(dataclasses.replace(cfg, moe_top_k=5))


def test_the_moe_presets_have_the_published_parameter_counts():
    mixtral = llama_config("mixtral-8x7b")
    assert round(param_count(mixtral) / 1e9, 1) == 46.7
    assert round(param_count(mixtral, active=True) / 1e9, 1) == 12.9
    # an approximation (multi-head for latent attention, every layer MoE): within 6% of 671B/37B
    deepseek = llama_config("deepseek-v3-like")
    assert param_count(deepseek) / 671e9 == pytest.approx(1, abs=0.06)
    assert param_count(deepseek, active=True) / 37e9 == pytest.approx(1, abs=0.06)


@needs_devices(8)
def test_the_planner_plans_expert_layouts_with_their_all_to_all_bytes():
    from jaxdist import plan

    assert plan.candidate_meshes("ep", 64, experts=8) == [
        "fsdp=8,expert=8", "data=2,fsdp=4,expert=8", "fsdp=16,expert=4", "data=2,fsdp=8,expert=4"]
    assert plan.candidate_meshes("ep", 8, experts=256) == ["expert=8", "fsdp=2,expert=4"]
    assert plan.candidate_meshes("ep", 256, experts=256) == [
        "expert=256", "fsdp=2,expert=128", "fsdp=32,expert=8", "data=2,fsdp=16,expert=8"]
    # one Mixtral layer of 128 tokens a row, 8 rows on expert=8: a row per device
    row = plan.plan_config("llama", "mixtral-8x7b", 8, "ep", "expert=8", memory_gib=80,
                           global_batch=8, tx=plan.make_tx("adam"),
                           assumptions=plan.Assumptions(),
                           overrides={"depth": 1, "seq_len": 128})
    assert not row.skipped and row.fits, row.reason
    ideal = ideal_all_to_all_bytes(128, 2, 4096, 4, 8)
    # buffers of twice an even split; dispatch and combine in the forward, its recompute (remat
    # full) and the backward: 6 directions; plus the expert ids in the forward and its recompute
    ids = 2 * 128 * 2 * 4 * 7 / 8
    assert row.all_to_all_bytes == pytest.approx(6 * 2 * ideal + 2 * ids)
    text = plan.format_plan([row], memory_gib=80, global_batch=8, optimizer="adam",
                            assumptions=plan.Assumptions())
    assert "a2a MiB" in text and "ep       expert=8" in text


def test_a_collapsed_router_shows_per_layer_in_the_metrics_tensorboard_and_the_plot(tmp_path):
    cfg = dataclasses.replace(CFG, depth=2)

    def collapsed():  # layer 0's router scores every expert alike: all go to experts 0 and 1
        model = Llama(cfg, rngs=nnx.Rngs(0))
        model.layers.router[...] = model.layers.router[...].at[0].set(0.0)
        return model

    trainer = Trainer(collapsed, optax.sgd(0.5), llama_loss, devices=1)
    state, metrics = trainer.step(trainer.init(), trainer.shard_batch(_batches()[0]))
    writer = MetricsWriter(tmp_path)  # what the trainer's monitor does with each step's metrics
    writer.write("train", 1, host_metrics(metrics))
    writer.close()
    [first] = read_records(tmp_path)
    assert first["moe_max_load_l0"] == 4 and first["moe_min_load_l0"] == 0  # top-2 of 8
    assert [first[f"moe_load_l0_e{j}"] for j in range(8)] == [4, 4, 0, 0, 0, 0, 0, 0]
    assert first["moe_max_load_l1"] < 4 and first["moe_dropped_l1"] == 0
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Scalars("train/moe_max_load_l0")[0].value == 4
    assert {"train/moe_min_load_l1", "train/moe_dropped_l1", "train/moe_load_l1_e7"} <= set(
        events.Tags()["scalars"])
    assert (tmp_path / "plots" / "expert_load.png") in plot_runs([tmp_path], tmp_path / "plots")
    assert (tmp_path / "plots" / "expert_load.png").stat().st_size > 5000


@pytest.mark.slow
def test_an_expert_parallel_run_killed_mid_run_and_rerun_ends_bitwise_equal(tmp_path):
    # the all-to-all exchange at its default capacity may drop tokens: that must resume too
    argv = ["--model", "llama", "--config", "smoke", "--vocab", "512", "--moe_experts", "4",
            "--moe_exchange", "all_to_all", "--strategy", "ep", "--mesh", "data=2,expert=4",
            "--max_steps", "12", "--checkpoint_every", "4", "--sample_bytes", "0", *STEP_EVENTS]
    env = {"JAXDIST_CACHE_DIR": str(tmp_path / "cache")}
    straight, work = tmp_path / "straight", tmp_path / "work"
    code, log = Run([*argv, "--workdir", str(straight)], module="experiments.lm",
                    env=env).finish()
    assert code == 0, log[-3000:]
    run = Run([*argv, "--workdir", str(work)], module="experiments.lm", env=env)
    code, log = run.act_at_step(6, lambda: run.send(signal.SIGKILL))
    assert code == -signal.SIGKILL and "done:" not in log
    code, log = Run([*argv, "--workdir", str(work)], module="experiments.lm", env=env).finish()
    assert code == 0 and "resuming at step " in log, log[-3000:]
    want = read_checkpoint_arrays(straight / "checkpoints", 12)
    got = read_checkpoint_arrays(work / "checkpoints", 12)
    assert want.keys() == got.keys() and any("expert_gate" in key for key in want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
