"""The public API: a user's own NNX model, optax optimizer and loss, data-parallel in a few lines;
one strategy vocabulary, each value carrying its own options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdist
from conftest import needs_devices
from jaxdist import STRATEGIES, Jit, LocalSGD, Pipeline, Pmap, Rules, ShardMap
from jaxdist.comm import mean_reduce
from jaxdist.parallel.strategies import resolve
from jaxdist.config import parse_config
from jaxdist.train.run_config import RunConfig, trainer_options

DATA_PARALLEL = [name for name, s in STRATEGIES.items() if s.parallelism == "data"]


class MLPWithBatchNorm(nnx.Module):
    """A user model with non-parameter state (batch statistics) to carry through the step."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean()}


def _separable_batches(rng, steps, batch=256):
    w = np.array([1.0, -2.0, 0.5, 1.5], np.float32)
    for _ in range(steps):
        x = rng.normal(size=(batch, 4)).astype(np.float32)
        yield x, (x @ w > 0).astype(np.int32)


@needs_devices(8)
@pytest.mark.parametrize("strategy", DATA_PARALLEL)
def test_a_user_model_with_batch_norm_trains_on_8_devices_and_syncs_back(strategy, rng):
    model = MLPWithBatchNorm(nnx.Rngs(0))
    initial_kernel = np.asarray(model.hidden.kernel[...]).copy()
    value = LocalSGD(every=2) if strategy == "local_sgd" else strategy
    dp = jaxdist.Trainer(model, optax.adam(1e-2), loss_fn, strategy=value, devices=8)
    state = dp.init()
    accuracies = []
    for batch in _separable_batches(rng, 120):
        state, metrics = dp.step(state, batch)
        accuracies.append(float(np.mean(np.asarray(metrics["accuracy"]))))
    assert np.mean(accuracies[-10:]) > 0.9
    dp.sync_model(state)
    assert not np.allclose(np.asarray(model.hidden.kernel[...]), initial_kernel)
    assert float(jnp.abs(model.norm.mean[...]).sum()) > 0  # batch statistics were carried along


def test_the_step_accepts_already_sharded_batches(rng):
    model = MLPWithBatchNorm(nnx.Rngs(0))
    dp = jaxdist.Trainer(model, optax.sgd(0.1), loss_fn, devices=2)
    batch = next(_separable_batches(rng, 1))
    s1, m1 = dp.step(dp.init(), batch)
    s2, m2 = dp.step(dp.init(), dp.shard_batch(batch))
    assert float(m1["loss"]) == float(m2["loss"])
    assert dp.global_batch_size(dp.shard_batch(batch)) == 256


def test_every_registered_strategy_is_a_name_the_trainer_accepts():
    assert tuple(STRATEGIES) == ("jit", "shard_map", "pmap", "local_sgd", "dp", "zero1", "fsdp",
                                 "tp", "sp", "fsdp_tp", "ep")
    for name, value in STRATEGIES.items():
        assert resolve(name) is value and value.name == name
        trainer = jaxdist.Trainer(MLPWithBatchNorm(nnx.Rngs(0)), optax.sgd(0.1), loss_fn,
                                  strategy=name, devices=1)
        assert trainer.strategy == name
        assert value.layout in ("rules", "mapped") and value.parallelism in ("data", "model")


@pytest.mark.parametrize("make, options, owner", [
    (ShardMap, {"every": 4}, "LocalSGD"),
    (Jit, {"reducer": mean_reduce()}, "ShardMap"),
    (Pmap, {"outer": optax.sgd(0.7)}, "LocalSGD"),
    (LocalSGD, {"batch_stats": "per_device"}, "ShardMap"),
    (Pmap, {"schedule": "1f1b"}, "Pipeline"),
])
def test_an_option_of_another_strategy_is_a_one_line_error(make, options, owner):
    with pytest.raises(jaxdist.UsageError, match=f"an option of {owner}") as error:
        make(**options)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("make, message", [
    (lambda: LocalSGD(every=0), "every=.* integer >= 1"),
    (lambda: ShardMap(batch_stats="synced"), "batch_stats must be one of 'global', 'per_device'"),
    (lambda: ShardMap(reducer=object()), "reducer must be a jaxdist.comm.GradReducer"),
    (lambda: Pipeline(schedule="zigzag"), "schedule must be one of 'gpipe', '1f1b'"),
    (lambda: Pipeline(microbatches=0), "microbatches=.* integer >= 1"),
    (lambda: Pipeline(rules="shard_map"), "by sharding rules"),
    (lambda: Rules(params={"hidden": "tensor"}), "unknown logical axis 'hidden'"),
])
def test_a_bad_option_is_a_one_line_error_when_the_value_is_made(make, message):
    with pytest.raises(jaxdist.UsageError, match=message) as error:
        make()
    assert len(str(error.value).splitlines()) == 1


def test_a_strategy_value_with_options_equals_its_flag_spelling():
    def from_flags(*argv):
        return trainer_options(parse_config(lambda _: RunConfig(), list(argv)))["strategy"]

    assert from_flags() == Jit() == resolve("jit")
    assert from_flags("--strategy", "shard_map") == ShardMap() == resolve("shard_map")
    assert from_flags("--strategy", "local_sgd", "--local_steps", "4") == LocalSGD(every=4)
    assert from_flags("--strategy", "fsdp") == STRATEGIES["fsdp"]
    assert dataclasses.replace(STRATEGIES["fsdp"], name="mine") == STRATEGIES["fsdp"]  # same rules
    assert Pipeline(rules="fsdp") == Pipeline(rules=STRATEGIES["fsdp"])
    diloco = from_flags("--strategy", "local_sgd", "--outer_optimizer", "nesterov")
    assert isinstance(diloco, LocalSGD) and diloco.outer is not None
    compressed = from_flags("--strategy", "shard_map", "--grad_reduce", "int8")
    assert isinstance(compressed, ShardMap) and compressed.reducer is not None


@pytest.mark.parametrize("options, message", [
    ({"strategy": "zero2"}, "unknown strategy 'zero2'"),
    ({"strategy": object()}, "strategy must be a name"),
    ({"strategy": "pmap", "mesh": "data=4,tensor=2"}, "runs over the data axis only"),
    ({"strategy": "jit", "mesh": "fsdp=8"}, "runs over the data axis only"),
    ({"strategy": "fsdp", "mesh": "fsdp=3"}, "needs 3 devices"),
    ({"strategy": Pipeline(), "mesh": "data=8"}, "Pipeline needs a mesh with pipeline > 1"),
    ({"microbatches": 0}, "microbatches must be at least 1"),
])
@needs_devices(8)
def test_a_strategy_the_mesh_does_not_fit_is_a_clear_error(options, message):
    with pytest.raises(jaxdist.UsageError, match=message):
        jaxdist.Trainer(MLPWithBatchNorm(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, **options)


def test_evaluate_without_eval_fn_is_a_usage_error():
    dp = jaxdist.Trainer(MLPWithBatchNorm(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=1)
    with pytest.raises(jaxdist.UsageError, match="eval_fn"):
        dp.evaluate(dp.init(), [])


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 64, rngs=rngs)
        self.b = nnx.Linear(64, 2, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


@needs_devices(8)
@pytest.mark.parametrize("strategy", ["jit", "shard_map", "fsdp", "zero1"])
def test_gradient_accumulation_equals_the_whole_batch_under_every_layout(strategy, rng):
    batches = list(_separable_batches(rng, 3, batch=64))

    def train(microbatches):
        trainer = jaxdist.Trainer(TwoLayers(nnx.Rngs(0)), optax.adam(1e-2), loss_fn,
                                  strategy=strategy, microbatches=microbatches)
        state = trainer.init()
        for batch in batches:
            state, _ = trainer.step(state, batch)
        return [np.asarray(x) for x in jax.tree.leaves(trainer.canonical(state).params)]

    for got, want in zip(train(4), train(1)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_jaxdist_and_the_benchmarks_import_without_grain_or_tfds():
    """The GPU machine's Python has jax, flax, optax and orbax only: training a model with
    arrays and the benchmarks must not need the data-pipeline dependencies at import."""
    import subprocess
    import sys

    from conftest import REPO

    script = ("import sys\nsys.modules['grain'] = None\nsys.modules['tensorflow_datasets'] = None\n"
              "import jaxdist, benchmarks.dp\nfrom jaxdist import Trainer, fit\nprint('imported')")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]
