"""GPipe over the pipeline axis computes what the unpipelined model computes: outputs, gradients and
training steps, alone or combined with data parallelism; GPipe, interleaved and 1F1B pass every
layer the context (e.g. segment ids) of exactly the rows it works on; 1F1B computes what GPipe
computes with GPipe's FLOPs, in memory that does not grow with the microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import needs_devices
from jaxdist import Pipeline, UsageError
from jaxdist.core.layout import Layout, active_layout, layers_then_loss, run_layers
from jaxdist.models.vit import Block, vit_config
from jaxdist.parallel import make_mesh
from jaxdist.parallel.pipeline import (
    as_stages,
    bubble_fraction,
    pipeline_call,
    stack_runners,
    stack_stages,
    unstack_stages,
)
from jaxdist.parallel.pipeline_1f1b import pipeline_loss_1f1b, residual_slots, schedule_1f1b

CFG = vit_config("tiny", embed=32, heads=4, mlp=64, patch=7)  # 16 tokens of 49 pixels
TOKENS, PIXELS = 16, 49


def _model(stages):
    rngs = nnx.Rngs(0)
    embed, head = nnx.Linear(PIXELS, CFG.embed, rngs=rngs), nnx.Linear(CFG.embed, 10, rngs=rngs)
    blocks = [Block(CFG, rngs=rngs) for _ in range(stages)]
    graphdefs = {"embed": nnx.split(embed)[0], "head": nnx.split(head)[0],
                 "block": nnx.split(blocks[0])[0]}
    params = {"embed": nnx.split(embed)[1], "head": nnx.split(head)[1],
              "stages": stack_stages([nnx.split(b)[1] for b in blocks])}
    return graphdefs, params


def _forward(graphdefs, params, tokens, mesh=None, microbatches=4):
    stage = lambda p, h: nnx.merge(graphdefs["block"], p)(h)  # noqa: E731
    h = nnx.merge(graphdefs["embed"], params["embed"])(tokens)
    if mesh is None:
        for p in unstack_stages(params["stages"]):
            h = stage(p, h)
    else:
        h = pipeline_call(stage, params["stages"], h, mesh=mesh, num_microbatches=microbatches)
    return jax.nn.log_softmax(nnx.merge(graphdefs["head"], params["head"])(h.mean(1)))


def _loss(graphdefs, params, batch, mesh=None):
    tokens, labels = batch
    log_probs = _forward(graphdefs, params, tokens, mesh)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()


def _batch(seed=0, n=32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, TOKENS, PIXELS)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def _close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=2e-6)


@needs_devices(8)
@pytest.mark.parametrize("shape", [  # deeper pipelines, each schedule compiled: the slow tier
    "pipeline=2,data=4", *(pytest.param(s, marks=pytest.mark.slow)
                           for s in ("pipeline=4,data=2", "pipeline=8"))])
def test_pipelined_outputs_and_gradients_equal_the_sequential_model(shape):
    mesh = make_mesh(shape)
    graphdefs, params = _model(mesh.shape["pipeline"])
    batch = _batch()
    _close(jax.jit(lambda p, x: _forward(graphdefs, p, x, mesh))(params, batch[0]),
           _forward(graphdefs, params, batch[0]))
    _close(jax.jit(jax.grad(lambda p: _loss(graphdefs, p, batch, mesh)))(params),
           jax.grad(lambda p: _loss(graphdefs, p, batch))(params))


def _train(graphdefs, params, batches, mesh=None):
    tx = optax.adam(1e-3)
    traces = []

    def step(state, batch):
        traces.append(1)
        params, opt_state = state
        grads = jax.grad(lambda p: _loss(graphdefs, p, batch, mesh))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state)

    state = (params, tx.init(params))
    if mesh is None:
        step = jax.jit(step)
    else:
        stage_sharded = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: NamedSharding(mesh, P("pipeline") if x.ndim and x.shape[0] ==
                                    mesh.shape["pipeline"] else P()), tree)
        shardings = (stage_sharded(params), stage_sharded(state[1]))
        state = jax.device_put(state, shardings)
        step = jax.jit(step, in_shardings=(shardings, NamedSharding(mesh, P("data"))),
                       out_shardings=shardings, donate_argnums=0)
    for batch in batches:
        state = step(state, batch)
    return state[0], len(traces)


@needs_devices(8)
@pytest.mark.parametrize("shape", ["pipeline=4,data=2", "pipeline=8"])
def test_three_pipelined_training_steps_equal_one_device_and_trace_once(shape):
    mesh = make_mesh(shape)
    graphdefs, params = _model(mesh.shape["pipeline"])
    batches = [_batch(seed) for seed in range(3)]
    want, _ = _train(graphdefs, params, batches)
    got, traces = _train(graphdefs, params, batches, mesh)
    _close(got, want)
    assert traces == 1
    assert jax.tree.leaves(got["stages"])[0].sharding.spec == P("pipeline")


@needs_devices(8)
def test_bad_pipeline_inputs_are_clear_errors():
    mesh = make_mesh("pipeline=4,data=2")
    graphdefs, params = _model(4)
    stage = lambda p, h: nnx.merge(graphdefs["block"], p)(h)  # noqa: E731
    h = jnp.zeros((32, TOKENS, CFG.embed))
    with pytest.raises(UsageError, match="does not split into 3 microbatches"):
        pipeline_call(stage, params["stages"], h, mesh=mesh, num_microbatches=3)
    with pytest.raises(UsageError, match=r"\[3\] stacked stages for a pipeline axis of size 4"):
        pipeline_call(stage, jax.tree.map(lambda x: x[:3], params["stages"]), h, mesh=mesh,
                      num_microbatches=4)
    with pytest.raises(UsageError, match="no axis 'stages'"):
        pipeline_call(stage, params["stages"], h, mesh=mesh, num_microbatches=4, axis="stages")
    with pytest.raises(UsageError, match="give every context leaf the batch as its leading"):
        pipeline_call(stage, params["stages"], h, mesh=mesh, num_microbatches=4,
                      context=jnp.zeros((16, TOKENS), jnp.int32))
    chunks = jax.tree.map(lambda x: jnp.stack([x, x], 1), params["stages"])  # (S, V=2, ...)
    with pytest.raises(UsageError, match=r"\[2\] chunks per stage for 3 virtual stages"):
        pipeline_call(stage, chunks, h, mesh=mesh, num_microbatches=4, virtual_stages=3)
    with pytest.raises(UsageError, match="needs at least as many microbatches as stages"):
        pipeline_call(stage, chunks, h, mesh=mesh, num_microbatches=2, virtual_stages=2)
    with pytest.raises(UsageError, match="8 layers do not split into 4 pipeline stages of 4"):
        as_stages({"w": jnp.zeros((8, 2))}, 4, 4)
    with pytest.raises(UsageError, match="virtual_stages=.... must be an integer >= 1"):
        Pipeline(schedule="interleaved", virtual_stages=0)


def test_the_bubble_shrinks_with_more_microbatches_and_with_virtual_stages():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 4, "1f1b") == pytest.approx(3 / 7)  # GPipe's ticks, reordered
    assert bubble_fraction(4, 4, "interleaved", 2) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 16) < bubble_fraction(4, 4)
    assert bubble_fraction(1, 8) == 0.0


@pytest.mark.parametrize("stages,microbatches", [(2, 2), (4, 8), (4, 16), (3, 7), (4, 2)])
def test_the_1f1b_schedule_runs_each_microbatch_once_per_stage_in_dependency_order(
        stages, microbatches):
    table = schedule_1f1b(stages, microbatches)
    assert len(table) == microbatches + 2 * (stages - 1)  # GPipe's M + S - 1 of each, overlapped
    for s in range(stages):
        forwards = [k for row in table for k in [row[s][0]] if k is not None]
        backwards = [k for row in table for k in [row[s][1]] if k is not None]
        assert forwards == backwards == list(range(microbatches))
    when = {(half, s, row[s][half]): t for t, row in enumerate(table) for s in range(stages)
            for half in (0, 1) if row[s][half] is not None}
    for (half, s, k), t in when.items():
        if half == 0 and s > 0:  # a forward after the stage before sent its output
            assert when[0, s - 1, k] < t
        if half == 1:  # a backward after its forward and after the stage after sent its gradient
            assert when[0, s, k] <= t
            assert s == stages - 1 or when[1, s + 1, k] < t
    # a stage keeps a microbatch from its forward to its backward: never more than the slots
    for s in range(stages):
        alive = max(sum(when[0, s, k] <= t <= when[1, s, k] for k in range(microbatches))
                    for t in range(len(table)))
        assert alive <= residual_slots(stages, microbatches) == min(microbatches, 2 * stages - 1)


def _compiled_step(schedule, microbatches, mesh, unroll=False, width=64, rows=4):
    """The compiled loss and gradients of 8 MLP layers with a squared-error head."""
    rng = np.random.default_rng(0)
    stacked = {"w": jnp.asarray(rng.normal(0, 0.1, (8, width, width)), jnp.float32)}
    head = jnp.asarray(rng.normal(size=width), jnp.float32)
    x = jnp.asarray(rng.normal(size=(microbatches * rows, width)), jnp.float32)
    y = jnp.asarray(rng.normal(size=microbatches * rows), jnp.float32)
    stage = lambda p, h: jax.lax.scan(  # noqa: E731
        lambda c, w: (c + jnp.tanh(c @ w), None), h, p["w"], unroll=True)[0]
    head_loss = lambda hd, h, t: jnp.mean((h @ hd - t) ** 2)  # noqa: E731
    options = dict(mesh=mesh, num_microbatches=microbatches, batch_axes=(), unroll=unroll)
    stages = as_stages(stacked, mesh.shape["pipeline"])

    def loss(stages, head):
        if schedule == "1f1b":
            return pipeline_loss_1f1b(stage, head_loss, stages, head, x, y, **options)
        return head_loss(head, pipeline_call(stage, stages, x, **options), y)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(stages, head).compile()


@needs_devices(4)
def test_1f1b_computes_gpipes_flops_and_its_memory_does_not_grow_with_the_microbatches():
    """Compiled on pipeline=4: FLOPs with every tick unrolled (XLA's cost analysis counts a loop
    body once), temporaries per device of the step as it runs. GPipe keeps every microbatch's
    activations; 1F1B at most 2 S - 1 microbatches' (here 7 of 16) plus the batch's input
    gradient, which any schedule returns."""
    mesh = make_mesh("pipeline=4", jax.devices()[:4])
    flops = {s: _compiled_step(s, 8, mesh, unroll=True).cost_analysis()["flops"]
             for s in ("gpipe", "1f1b")}
    assert flops["1f1b"] == pytest.approx(flops["gpipe"], rel=0.10), flops
    temp = {(s, m): _compiled_step(s, m, mesh).memory_analysis().temp_size_in_bytes
            for s in ("gpipe", "1f1b") for m in (8, 32)}
    micro_input = 4 * 64 * 4  # one microbatch entering a stage: rows x width x float32
    gpipe_growth = (temp["gpipe", 32] - temp["gpipe", 8]) / 24
    one_f_growth = (temp["1f1b", 32] - temp["1f1b", 8]) / 24
    assert one_f_growth <= 4 * micro_input, temp  # its input, its gradient: no activations
    assert gpipe_growth >= 3 * one_f_growth, temp
    assert temp["1f1b", 32] < temp["gpipe", 32], temp


# ---------------------------------------------------------------------------------------------
# A per-row context (segment ids of packed documents) through both schedules

ROWS, SEQ, WIDTH, LAYERS = 24, 4, 8, 8  # 24 rows: 1, 2, 3 or 6 microbatches per data group


def _context_layer(params, h, context):
    """A layer whose output depends on every row's context."""
    mixed = jnp.tanh(h @ params["w"] + 0.1 * context["positions"][..., None])
    return h + 0.25 * mixed * (1 + context["segments"][..., None])


def _head_loss(head, h, targets):
    return (((h @ head) - targets["y"]) ** 2 * targets["mask"]).mean()


def _context_problem(seed=0):
    rng = np.random.default_rng(seed)
    stacked = {"w": rng.normal(0, 0.5, (LAYERS, WIDTH, WIDTH)).astype(np.float32)}
    head = rng.normal(size=WIDTH).astype(np.float32)
    h = rng.normal(size=(ROWS, SEQ, WIDTH)).astype(np.float32)
    targets = {"y": rng.normal(size=(ROWS, SEQ)).astype(np.float32),
               "mask": (rng.random((ROWS, SEQ)) > 0.3).astype(np.float32)}
    context = {"segments": rng.integers(0, 3, (ROWS, SEQ)).astype(np.int32),
               "positions": np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1))}
    return stacked, head, h, targets, context


def _context_loss(layout, schedule, stacked, head, h, targets, context):
    with active_layout(layout):
        if schedule == "1f1b":
            return layers_then_loss(_context_layer, _head_loss, stacked, head, h, targets,
                                    context=context)
        return _head_loss(head, run_layers(_context_layer, stacked, h, context=context), targets)


MESHES = [("pipeline=2,data=4", 2, 1), ("pipeline=2,data=4", 2, 3),  # (mesh, S, M)
          ("pipeline=4,data=2", 4, 2), ("pipeline=4,data=2", 4, 6)]
CONTEXT_CASES = [(schedule, shape, m) for schedule in ("gpipe", "1f1b", "interleaved")
                 for shape, stages, m in MESHES
                 if schedule != "interleaved" or m >= stages]  # interleaved needs M >= S


@needs_devices(8)
@pytest.mark.parametrize("schedule,shape,microbatches", CONTEXT_CASES)
def test_pipelines_give_every_layer_the_context_of_its_rows(schedule, shape, microbatches):
    mesh = make_mesh(shape)
    run, then_loss = stack_runners(mesh, microbatches=microbatches, schedule=schedule,
                                   virtual_stages=2)
    layout = Layout(mesh, {}, run, then_loss)
    stacked, head, h, targets, context = _context_problem()

    def value_and_grads(layout, context):
        def loss(stacked, head, h):
            return _context_loss(layout, schedule, stacked, head, h, targets, context)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(stacked, head, h)

    want = value_and_grads(None, context)  # the sequential scan
    got = jax.jit(lambda c: value_and_grads(layout, c))(context)
    _close(got, want)
    if schedule != "1f1b":
        with active_layout(layout):
            outputs = jax.jit(lambda c: run_layers(_context_layer, stacked, h, context=c))(context)
        _close(outputs, run_layers(_context_layer, stacked, h, context=context))
    # the context matters: the rows' context in another order gives another loss and gradients
    reversed_rows = jax.tree.map(lambda c: c[::-1], context)
    other = value_and_grads(None, reversed_rows)
    assert not np.allclose(got[0], other[0], rtol=1e-3)
    assert not np.allclose(got[1][0]["w"], other[1][0]["w"], rtol=1e-3)
