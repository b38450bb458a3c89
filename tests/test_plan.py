"""The pre-flight planner (`python -m jaxdist.plan`): its memory per device is what the real step
allocates, configs over the budget are rejected with the reason, bad input is one line and exit 2,
and the CLI prints the assumptions, the table and a recommended mesh."""

import io
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist import plan
from jaxdist.models import ViT, vit_config
from jaxdist.observe import collective_ledger
from jaxdist.parallel import ShardedTrainer, make_mesh
from jaxdist.core.step import init_state

MESHES = [("fsdp", "fsdp=8"), ("fsdp_tp", "data=2,fsdp=2,tensor=2")]
BATCH = 64
SHALLOW = {"depth": 2}  # ViT-tiny with 2 blocks instead of 4: half the compile time
TINY_BUDGET_GIB = 0.001


@pytest.fixture(scope="module")
def planned():
    """The planner's rows for ViT-tiny on 8 devices, with a budget nothing fits in."""
    rows = {}
    for strategy, mesh in MESHES:
        rows[strategy, mesh] = plan.plan_config(
            "vit", "tiny", 8, strategy, mesh, memory_gib=TINY_BUDGET_GIB, global_batch=BATCH,
            tx=plan.make_tx("adam"), assumptions=plan.Assumptions(), overrides=SHALLOW)
    return rows


def _shard_bytes(tree):
    """Bytes device 0 really holds of a tree of arrays."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", MESHES)
def test_planned_memory_matches_the_real_step_compiled_on_8_devices_within_10_percent(
        planned, strategy, mesh):
    row = planned[strategy, mesh]
    assert not row.skipped, row.reason
    # independently: the trainer's own step, run once on the 8 devices with real arrays (jit,
    # default compiler options); lowering it again then returns that same cached executable
    model_fn = lambda: ViT(vit_config("tiny", **SHALLOW), rngs=nnx.Rngs(0))  # noqa: E731
    trainer = ShardedTrainer(model_fn, optax.adam(1e-3), loss_fn, mesh=make_mesh(mesh),
                             strategy=strategy)
    state = trainer.place(init_state(model_fn(), optax.adam(1e-3))[1])  # eager: no init compile
    real_params, real_opt = _shard_bytes(state.params), _shard_bytes(state.opt_state)
    rng = np.random.default_rng(0)
    batch = trainer.shard_batch((rng.integers(0, 255, (BATCH, 28, 28, 1), dtype=np.uint8),
                                 rng.integers(0, 10, BATCH).astype(np.int32)))
    state, metrics = trainer.step(state, batch)
    assert math.isfinite(float(metrics["loss"]))
    compiled = trainer.lower(state, batch).compile()
    real = compiled.memory_analysis()
    real_peak = (real.argument_size_in_bytes + real.temp_size_in_bytes
                 + real.output_size_in_bytes - real.alias_size_in_bytes)
    ledger = collective_ledger(compiled.as_text(), 8)

    m = row.memory
    assert m.params == pytest.approx(real_params, rel=0.10)
    assert m.optimizer == pytest.approx(real_opt, rel=0.10)
    assert m.temp == pytest.approx(real.temp_size_in_bytes, rel=0.10)
    assert m.peak_estimate == pytest.approx(real_peak, rel=0.10)
    assert row.wire_bytes == pytest.approx(ledger.total(wire=True), rel=0.10)
    assert row.compute_s > 0 and row.comm_s > 0


def test_a_config_over_the_budget_is_rejected_with_the_bytes_that_do_not_fit(planned):
    row = planned["fsdp", "fsdp=8"]
    assert not row.fits
    assert row.reason.startswith("rejected: needs ")
    assert f"GiB/device > {TINY_BUDGET_GIB:g} GiB budget (params " in row.reason
    assert "optimizer" in row.reason and "temp" in row.reason
    table = plan.format_plan(list(planned.values()), memory_gib=TINY_BUDGET_GIB,
                             global_batch=BATCH, optimizer="adam",
                             assumptions=plan.Assumptions())
    assert "NO: needs" in table
    assert "none fits in 0.001 GiB/device" in table


def test_a_mesh_whose_rules_reject_the_model_is_skipped_with_the_reason():
    kw = dict(memory_gib=1, tx=plan.make_tx("adam"), assumptions=plan.Assumptions())
    # ViT-tiny's 64-wide embedding does not split 3 ways; a batch of 4 does not split 8 ways
    row = plan.plan_config("vit", "tiny", 6, "tp", "data=2,tensor=3", global_batch=6, **kw)
    assert row.skipped and row.reason.startswith("skipped: parameter ")
    assert "does not divide over mesh axes tensor (3 ways)" in row.reason
    row = plan.plan_config("vit", "tiny", 8, "dp", "data=8", global_batch=4, **kw)
    assert row.skipped and row.reason == "skipped: global batch 4 does not split into 8 pieces"


def test_the_enumerated_meshes_per_strategy_and_device_count():
    assert plan.candidate_meshes("dp", 8) == ["data=8"]
    assert plan.candidate_meshes("fsdp", 16) == ["fsdp=16", "data=2,fsdp=8"]
    assert plan.candidate_meshes("tp", 8) == ["data=4,tensor=2"]
    assert plan.candidate_meshes("tp", 3) == []
    assert plan.candidate_meshes("fsdp_tp", 8) == ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]
    assert plan.candidate_meshes("fsdp_tp", 4) == ["fsdp=2,tensor=2"]


def test_alpha_beta_time_counts_ring_steps_and_wire_bytes():
    from jaxdist.observe.ledger import Collective, Ledger

    ledger = Ledger([Collective("all-reduce", 4, count=2, payload_bytes=1_000_000)])
    a = plan.Assumptions(peak_tflops=100, latency_us=5, bandwidth_gbps=8)  # 1 GB/s
    # 2 all-reduces x 2(4-1) steps x 5 us + 1 MB x 2(3/4) / 1 GB/s
    assert plan.comm_seconds(ledger, a) == pytest.approx(2 * 6 * 5e-6 + 1.5e-3)
    assert plan.compute_seconds(2e12, a) == pytest.approx(0.02)


class _Costs:
    def __init__(self, costs):
        self.costs = costs

    def cost_analysis(self):
        return self.costs


def test_flops_are_read_from_a_dict_or_a_list_of_dicts():
    assert plan.flops_per_device(_Costs({"flops": 5.0})) == 5.0
    assert plan.flops_per_device(_Costs([{"flops": 5.0}])) == 5.0
    assert plan.flops_per_device(_Costs(None)) == 0.0


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt"], "unknown model 'gpt'"),
    (["--vit_size", "small,huge"], "unknown ViT size 'huge'"),
    (["--strategies", "dp,zero3"], "unknown strategy 'zero3'"),
    (["--devices", "8,0"], "device counts must be at least 1, got 0"),
    (["--devices", "eight"], "--devices takes comma-separated integers"),
    (["--memory_gib", "0"], "the memory budget must be positive"),
    (["--memory_gib", "-2"], "the memory budget must be positive"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--devices", "64"], "needs as many virtual CPU devices, but JAX started with 8"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@needs_devices(2)
def test_the_cli_prints_the_assumptions_a_table_and_a_recommended_mesh(capsys):
    out = io.StringIO()
    assert plan.main(["--vit_size", "tiny", "--devices", "2", "--strategies", "dp",
                      "--memory_gib", "1", "--global_batch", "16"], out=out) == 0
    text = out.getvalue()
    assert "Assumptions" in text and "no overlap assumed" in text and "100 TFLOP/s" in text
    lines = text.splitlines()
    assert any(line.startswith("vit-tiny") and "data=2" in line and line.endswith("yes")
               for line in lines)
    recommended = lines[lines.index("Recommended (fastest that fits):") + 1]
    assert recommended.split()[:2] == ["vit-tiny", "n=2"] and "ms/step" in recommended
    assert "plan: [1/1] vit-tiny n=2 dp data=2" in capsys.readouterr().err  # progress on stderr
