"""The ledger counts the collectives XLA really emits, with their bytes; the memory report splits a
step's bytes per device by what holds them."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import needs_devices
from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist.models import ViT, vit_config
from jaxdist.observe import collective_ledger, memory_report, total_bytes
from jaxdist.observe.ledger import group_size, shape_bytes, wire_factor
from jaxdist import Trainer, make_mesh

VIT = vit_config("tiny", embed=64, depth=2, heads=4, mlp=128, patch=7)


def _compiled(strategy, shape, batch=64):
    trainer = Trainer(lambda: ViT(VIT, rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn,
                      mesh=make_mesh(shape), strategy=strategy)
    state = trainer.abstract_state()
    batch = (jax.ShapeDtypeStruct((batch, 28, 28, 1), np.float32, sharding=trainer.batch_sharding),
             jax.ShapeDtypeStruct((batch,), np.int32, sharding=trainer.batch_sharding))
    return trainer, state, trainer.lower(state, batch).compile()


@needs_devices(8)
def test_data_parallel_all_reduces_the_gradient_bytes_once_over_8_devices():
    _, state, compiled = _compiled("dp", "data=8")
    ledger = collective_ledger(compiled.as_text(), 8)
    grad_bytes = total_bytes(state.params)
    assert ledger.count("all-gather") == 0
    assert {c.group_size for c in ledger.collectives} == {8}
    # gradients plus a few scalar metrics, all-reduced once
    assert grad_bytes <= ledger.total("all-reduce") <= grad_bytes + 64
    assert ledger.total("all-reduce", wire=True) == pytest.approx(
        ledger.total("all-reduce") * 2 * 7 / 8)


@needs_devices(8)
def test_fsdp_gathers_the_parameters_and_reduces_the_gradients():
    trainer, state, compiled = _compiled("fsdp", "fsdp=8")
    ledger = collective_ledger(compiled.as_text(), 8)
    param_bytes = total_bytes(state.params)
    # every sharded parameter is gathered for the forward pass (and may be again for backward)
    assert ledger.total("all-gather") >= 0.98 * param_bytes
    # XLA:CPU has no native reduce-scatter: it all-reduces and slices; other backends scatter
    reduced = ledger.total("all-reduce") + ledger.total("reduce-scatter")
    assert reduced >= 0.98 * param_bytes


@needs_devices(8)
def test_a_collective_permute_is_counted_with_its_bytes_and_its_loop_trips():
    mesh = make_mesh("pipeline=8")

    def shift(x):
        def body(_, y):
            return jax.lax.ppermute(y, "pipeline", [(i, (i + 1) % 8) for i in range(8)])
        return jax.lax.fori_loop(0, 3, body, x)

    f = jax.jit(jax.shard_map(shift, mesh=mesh, in_specs=P("pipeline"), out_specs=P("pipeline")))
    x = jax.ShapeDtypeStruct((8 * 16, 32), np.float32,
                             sharding=NamedSharding(mesh, P("pipeline")))
    ledger = collective_ledger(f.lower(x).compile().as_text(), 8)
    assert ledger.count("collective-permute") == 3
    assert ledger.total("collective-permute") == 3 * 16 * 32 * 4


@needs_devices(8)
def test_fsdp_holds_an_eighth_of_the_state_per_device_within_5_percent():
    trainer, state, compiled = _compiled("fsdp", "fsdp=8")
    report = memory_report(compiled, state, trainer.grad_shardings)
    assert report.params <= total_bytes(state.params) / 8 * 1.05
    assert report.optimizer <= total_bytes(state.opt_state) / 8 * 1.05
    assert report.grads <= total_bytes(state.params) / 8 * 1.05
    # the compiled program's arguments are exactly the state shards plus the batch shard
    batch_bytes = 64 // 8 * (28 * 28 * 4 + 4)
    assert report.arguments == report.params + report.optimizer + 4 + batch_bytes
    assert report.temp > 0


def test_replica_groups_in_every_spelling():
    assert group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}") == 4
    assert group_size("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}") == 4
    assert group_size("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, x") == 4
    assert group_size("replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp'}, x") == 8
    assert group_size("replica_groups=mesh['fsdp'=8] {'fsdp':(4)2}, x") == 2
    assert shape_bytes("(f32[10,64]{1,0}, bf16[3]{0}, f32[])") == 2560 + 6 + 4
    assert wire_factor("all-reduce", 1) == 0.0


def test_async_pairs_count_once_and_loops_multiply_by_their_trip_count():
    hlo = """
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
}
%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}
ENTRY %main.2 (a: f32[8]) -> f32[32] {
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%a), replica_groups=[1,4]<=[4], dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}
}
"""
    ledger = collective_ledger(hlo)
    assert ledger.count("all-gather") == 1 and ledger.total("all-gather") == 32 * 4
    assert ledger.count("all-reduce") == 5 and ledger.total("all-reduce") == 5 * 8 * 4
    assert ledger.unknown_trip_counts == 0
