"""The pre-flight planner (`python -m jaxdist.plan`): its memory per device is what the real step
allocates (ViT and LM, pipelined or not), configs over the budget are rejected with the reason,
bad input is one line and exit 2, and the CLI prints the assumptions, the table and a recommended
mesh."""

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
from jaxdist.models.lm import REMAT_POLICIES, GPT, lm_config, lm_loss, param_count, train_flops
from jaxdist.parallel.pipeline import bubble_fraction
from jaxdist.observe import collective_ledger
from jaxdist import Pipeline, Trainer, make_mesh
from jaxdist.config import parse_config
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


def _assert_the_row_is_the_real_step_within_10_percent(row, trainer, state, batch):
    """Runs one real step, compiles it, and holds the planned row's bytes against it."""
    real_params, real_opt = _shard_bytes(state.params), _shard_bytes(state.opt_state)
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


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", MESHES)
def test_planned_memory_matches_the_real_step_compiled_on_8_devices_within_10_percent(
        planned, strategy, mesh):
    row = planned[strategy, mesh]
    assert not row.skipped, row.reason
    # independently: the trainer's own step, run once on the 8 devices with real arrays (jit,
    # default compiler options); lowering it again then returns that same cached executable
    model_fn = lambda: ViT(vit_config("tiny", **SHALLOW), rngs=nnx.Rngs(0))  # noqa: E731
    trainer = Trainer(model_fn, optax.adam(1e-3), loss_fn, mesh=make_mesh(mesh),
                      strategy=strategy)
    state = trainer.place(init_state(model_fn(), optax.adam(1e-3))[1])  # eager: no init compile
    rng = np.random.default_rng(0)
    batch = trainer.shard_batch((rng.integers(0, 255, (BATCH, 28, 28, 1), dtype=np.uint8),
                                 rng.integers(0, 10, BATCH).astype(np.int32)))
    _assert_the_row_is_the_real_step_within_10_percent(row, trainer, state, batch)
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
    (["--model", "gpt"], "argument --model: invalid choice: 'gpt'"),
    (["--model", "lm", "--lm_size", "huge"], "unknown LM size 'huge'"),
    (["--model", "lm", "--lm_size", "test", "--pipeline_stages", "3"],
     "lm-test's 4 layers do not split into 3 pipeline stages"),
    (["--model", "lm", "--pipeline_stages", "two"], "argument --pipeline_stages: invalid"),
    (["--model", "lm", "--remat", "most"], "argument --remat: invalid choice: 'most'"),
    (["--model", "lm", "--schedules", "gpipe,zb"], "'zb' is not one of gpipe, 1f1b"),
    (["--model", "lm", "--pipeline_microbatches", "0"], "--pipeline_microbatches must be at least 1"),
    (["--model", "lm", "--seq_len", "0"], "LM sizes must be positive"),
    (["--remat", "full"], "--remat: options of the language models (--model lm or llama), not "
                          "--model vit"),
    (["--vit_size", "small,huge"], "unknown ViT size 'huge'"),
    (["--strategies", "dp,zero3"], "unknown strategy 'zero3'"),
    (["--devices", "8,0"], "device counts must be at least 1, got 0"),
    (["--devices", "eight"], "argument --devices: invalid"),
    (["--devices", ""], "give at least one device count"),
    (["--memory_gib", "0"], "the memory budget must be positive"),
    (["--memory_gib", "-2"], "the memory budget must be positive"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--devices", "64"], "needs as many virtual CPU devices, but JAX started with 8"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--config", "smoke"], "the planner has no config variants"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "error: " in err and message in err and "\n" not in err


def test_every_flag_is_a_field_of_the_plan_config_with_its_help():
    """One typed config, parsed like every recipe's: each field is a flag with a docstring, the
    models offered are the registry's models with named sizes, the defaults are the planner's."""
    import dataclasses
    import typing

    from jaxdist.config import field_docs, literal_choices

    fields = {f.name for f in dataclasses.fields(plan.PlanConfig)}
    assert fields == {
        "model", "vit_size", "lm_size", "llama_size", "remat", "seq_len", "pipeline_stages",
        "pipeline_microbatches", "schedules", "context", "devices", "memory_gib", "bandwidth_gbps",
        "latency_us", "peak_tflops", "global_batch", "strategies", "optimizer"}
    assert set(field_docs(plan.PlanConfig)) == fields
    hints = typing.get_type_hints(plan.PlanConfig)
    assert literal_choices(hints["model"]) == plan.MODELS == ("vit", "lm", "llama")
    assert literal_choices(hints["remat"]) == REMAT_POLICIES
    assert typing.get_args(typing.get_args(hints["schedules"])[0]) == plan.SCHEDULES
    cfg = parse_config(lambda variant: plan.PlanConfig(), [
        "--model", "lm", "--lm_size", "test,1.3b", "--devices", "8,16", "--memory_gib", "80",
        "--pipeline_stages", "2", "--schedules", "1f1b", "--remat", "dots"])
    assert (cfg.sizes, cfg.devices, cfg.memory_gib, cfg.pipeline_stages, cfg.schedules) == (
        ("test", "1.3b"), (8, 16), 80.0, (2,), ("1f1b",))
    assert cfg.overrides == {"remat": "dots"}
    assert plan.PlanConfig().sizes == (plan.DEFAULT_SIZES["vit"],)


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


# ---------------------------------------------------------------------------------------------
# The LM: (inputs, targets) token batches, remat, pipeline meshes under GPipe and 1F1B

LM_SIZE, LM_BATCH, LM_M = "tiny", 32, 8  # 0.82M parameters, 128 tokens; M = 2 S on pipeline=4
LM_MESHES = [("fsdp", "data=2,fsdp=4", ""), ("dp", "data=2,pipeline=4", "gpipe"),
             ("dp", "data=2,pipeline=4", "1f1b")]


@pytest.fixture(scope="module")
def lm_planned():
    """The planner's rows for the tiny LM (remat full, the LM default) on 8 devices."""
    return {(strategy, mesh, schedule): plan.plan_config(
        "lm", LM_SIZE, 8, strategy, mesh, memory_gib=TINY_BUDGET_GIB, global_batch=LM_BATCH,
        tx=plan.make_tx("adam"), assumptions=plan.Assumptions(), schedule=schedule or "gpipe")
        for strategy, mesh, schedule in LM_MESHES}


def test_lm_rows_compile_and_report_memory_and_the_pipeline_bubble(lm_planned):
    for (strategy, mesh, schedule), row in lm_planned.items():
        assert not row.skipped, row.reason
        m = row.memory
        assert m.params > 0 and m.optimizer > 0 and m.temp > 0 and m.peak_estimate > m.temp
        assert row.model == "lm-tiny" and "remat full" in row.inputs
        assert row.schedule == schedule and row.compute_s > 0 and row.comm_s > 0
        if schedule:
            # GPipe and 1F1B: (S-1)/(M+S-1) ticks of M+S-1 forward (and as many backward) serve
            # no microbatch; 1F1B runs the same ticks in another order
            bubble = {"gpipe": 3 / 11, "1f1b": 3 / 11}[schedule]
            assert row.microbatches == LM_M and row.bubble == pytest.approx(bubble)
            assert row.step_s == pytest.approx(row.compute_s / (1 - bubble) + row.comm_s)
        else:
            assert row.microbatches == 0 and row.step_s == pytest.approx(row.compute_s + row.comm_s)
    # memory is per device, i.e. per stage: a stage holds a quarter of the layers (and the
    # embedding, which is not part of the stack)
    cfg = lm_config(LM_SIZE)
    whole, embedding = 4 * param_count(cfg), 4 * (cfg.vocab * cfg.embed + cfg.embed)
    stage = lm_planned["dp", "data=2,pipeline=4", "gpipe"].memory.params
    assert stage == embedding + (whole - embedding) // 4


def test_1f1b_holds_fewer_activations_per_stage_than_gpipe_at_the_same_microbatches(lm_planned):
    gpipe = lm_planned["dp", "data=2,pipeline=4", "gpipe"].memory
    one_f_one_b = lm_planned["dp", "data=2,pipeline=4", "1f1b"].memory
    assert one_f_one_b.params == gpipe.params and one_f_one_b.optimizer == gpipe.optimizer
    assert one_f_one_b.temp <= gpipe.temp, (one_f_one_b.temp, gpipe.temp)


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh,schedule", LM_MESHES)
def test_planned_lm_memory_matches_the_real_step_compiled_on_8_devices_within_10_percent(
        lm_planned, strategy, mesh, schedule):
    row = lm_planned[strategy, mesh, schedule]
    assert not row.skipped, row.reason
    cfg = plan.planned_model("lm", LM_SIZE).config
    assert cfg == lm_config(LM_SIZE, remat=plan.DEFAULT_LM_REMAT)
    model_fn = lambda: GPT(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    value = Pipeline(rules=strategy, microbatches=LM_M, schedule=schedule) if schedule else strategy
    trainer = Trainer(model_fn, optax.adam(1e-3), lm_loss, mesh=make_mesh(mesh), strategy=value)
    state = trainer.place(init_state(model_fn(), optax.adam(1e-3))[1])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, (LM_BATCH, cfg.seq_len + 1))
    batch = trainer.shard_batch((tokens[:, :-1].astype(np.int32),
                                 tokens[:, 1:].astype(np.int32)))
    _assert_the_row_is_the_real_step_within_10_percent(row, trainer, state, batch)


def test_the_1f1b_step_has_no_conditional_so_its_ledger_is_what_every_stage_sends():
    """1F1B's ticks are unconditional programs: a conditional's collectives would run in no fixed
    order on XLA:CPU (and be counted at every tick by the ledger). So the HLO has no conditional,
    the ppermutes run once per forward tick (S - 1 + M) and once per backward tick (M + S - 1)
    (less the last one, whose gradient no stage receives: with one cool-down tick XLA drops it),
    the row's wire bytes are the ledger's, and its bubble is GPipe's."""
    trainer = Trainer(lambda: GPT(lm_config("test"), rngs=nnx.Rngs(0)), plan.make_tx("adam"),
                      lm_loss, mesh=make_mesh("data=4,pipeline=2"),
                      strategy=Pipeline(schedule="1f1b", microbatches=4))
    analysis = plan.analyze_step(trainer, plan.planned_model("lm", "test").batch(16))
    assert " conditional(" not in analysis.hlo
    assert 2 * (4 + 2 - 1) - 1 <= analysis.ledger.count("collective-permute") <= 2 * (4 + 2 - 1)
    row = plan.plan_config("lm", "test", 8, "dp", "data=4,pipeline=2", schedule="1f1b",
                           memory_gib=1, global_batch=16, tx=plan.make_tx("adam"),
                           assumptions=plan.Assumptions())
    assert row.wire_bytes == pytest.approx(analysis.ledger.total(wire=True))
    assert row.bubble == pytest.approx(bubble_fraction(2, 4, "gpipe")) == 1 / 5


def test_lm_model_flops_agree_with_xla_where_its_cost_analysis_counts_right():
    """XLA's cost analysis counts a scan's body once (the layer stack): with one layer it is
    right, and the planner's model FLOPs (matmuls only) are within 10% of it."""
    for remat in ("none", "full"):
        spec = plan.planned_model("lm", "tiny", {"depth": 1, "remat": remat})
        trainer = Trainer(spec.model_fn(), plan.make_tx("adam"), spec.loss_fn,
                          mesh=make_mesh("data=8"), strategy="dp")
        xla = plan.analyze_step(trainer, spec.batch(LM_BATCH)).flops
        assert spec.step_flops(LM_BATCH) / 8 == pytest.approx(xla, rel=0.10), remat
    # a deeper stack: more FLOPs in the model, the same count from XLA's scan body
    cfg = lm_config("tiny", remat="full")
    assert train_flops(cfg, 1000) > train_flops(lm_config("tiny", depth=1, remat="full"), 1000)


def test_the_lm_meshes_add_pipelines_where_they_divide_the_devices_and_the_depth():
    assert plan.candidate_meshes("dp", 8, layers=4) == [
        "data=8", "data=4,pipeline=2", "data=2,pipeline=4"]
    assert plan.candidate_meshes("fsdp", 8, layers=6) == [  # 6 layers: no pipeline=4
        "fsdp=8", "data=2,fsdp=4", "fsdp=4,pipeline=2"]
    assert plan.candidate_meshes("sp", 8) == ["data=4,tensor=2"]
    assert plan.candidate_meshes("tp", 16, layers=24) == [
        "data=8,tensor=2", "data=4,tensor=2,pipeline=2", "data=2,tensor=2,pipeline=4"]
    assert plan.candidate_meshes("fsdp_tp", 8, layers=4) == [
        "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=2,pipeline=2"]
    assert plan.candidate_meshes("zero1", 6, layers=4) == ["data=6", "data=3,pipeline=2"]
    assert plan.candidate_meshes("dp", 8, layers=4, stages=[4]) == ["data=8", "data=2,pipeline=4"]


def test_lm_configs_the_pipeline_cannot_run_are_skipped_with_the_reason():
    kw = dict(memory_gib=1, tx=plan.make_tx("adam"), assumptions=plan.Assumptions())
    row = plan.plan_config("lm", "small", 8, "dp", "data=2,pipeline=4", global_batch=16, **kw)
    assert row.skipped and row.reason == (
        "skipped: lm-small's 6 layers do not split into 4 pipeline stages")
    row = plan.plan_config("lm", "test", 8, "dp", "data=2,pipeline=4", global_batch=8, **kw)
    assert row.skipped and row.reason == ("skipped: global batch 8 does not split into 8 "
                                          "microbatches on each of 2 data-parallel groups")
    row = plan.plan_config("lm", "test", 8, "dp", "data=2,pipeline=4", global_batch=16,
                           schedule="interleaved", **kw)  # 4 layers: not 4 stages x 2 chunks
    assert row.skipped and "interleaved needs 4 x 2 chunks" in row.reason


@needs_devices(4)
def test_the_cli_plans_the_lm_with_pipeline_columns(capsys):
    out = io.StringIO()
    assert plan.main(["--model", "lm", "--lm_size", "test", "--devices", "4", "--strategies",
                      "dp", "--pipeline_stages", "2", "--schedules", "1f1b", "--memory_gib", "1",
                      "--global_batch", "16"], out=out) == 0
    text = out.getvalue()
    assert "model's training FLOPs" in text and "bubble = (S-1)/(M+S-1) for gpipe" in text
    assert "sequences of 32 int32 tokens" in text and "remat full" in text
    lines = text.splitlines()
    assert any(line.split()[:7] == ["model", "n", "strategy", "mesh", "sched", "M", "bubble"]
               for line in lines)
    piped = [line for line in lines if line.startswith("lm-test") and "pipeline=2" in line]
    assert len(piped) == 1 and piped[0].split()[4:7] == ["1f1b", "4", "0.20"]  # GPipe's 1/5
    assert any(line.startswith("lm-test") and " data=4 " in line for line in lines)
    recommended = lines[lines.index("Recommended (fastest that fits):") + 1]
    assert recommended.split()[:2] == ["lm-test", "n=4"] and "ms/step" in recommended
    assert "plan: [2/2] lm-test n=4 dp data=2,pipeline=2 1f1b" in capsys.readouterr().err
