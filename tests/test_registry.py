"""The model registry (`jaxdist.models.registry`): every registered model builds, its example batch
runs its loss and its evaluation, its parameter count is the module's, and recipes and the
planner look models up there."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdist.errors import UsageError
from jaxdist.models import get_model, model_names
from jaxdist.models.registry import TASKS, register


def _zeros(structs):
    return tuple(jnp.zeros(s.shape, s.dtype) for s in structs)


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_builds_and_its_example_batch_runs_its_loss(name):
    spec = get_model(name)
    assert spec.name == name and spec.task in TASKS
    variant = spec.variant()  # the smallest size
    model = variant.build(seed=0)
    loss, metrics = variant.loss_fn(model, _zeros(variant.batch(2)))
    assert loss.shape == () and math.isfinite(float(loss)) and isinstance(metrics, dict)
    sums = variant.eval_fn(model, _zeros(variant.eval_batch(2)))
    assert float(sums["count"]) == 0  # an all-padding batch counts nothing
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert variant.param_count == params
    assert variant.title and variant.inputs and variant.label.startswith(name)


@pytest.mark.parametrize("name", model_names())
def test_a_seed_gives_the_same_parameters_and_another_seed_others(name):
    variant = get_model(name).variant()
    a, b, c = (jax.tree.leaves(nnx.state(variant.model_fn(seed)(), nnx.Param))
               for seed in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("name", model_names())
def test_a_random_batch_has_the_example_batchs_shapes_and_runs_the_loss(name):
    variant = get_model(name).variant()
    batch = variant.random_batch(4, 0)
    assert [(x.shape, x.dtype) for x in batch] == [(s.shape, s.dtype) for s in variant.batch(4)]
    loss, _ = variant.loss_fn(variant.build(0), batch)
    assert math.isfinite(float(loss))
    rng = np.random.default_rng(0)  # a seed, or a generator that goes on drawing
    assert all(np.array_equal(x, y) for x, y in zip(batch, variant.random_batch(4, rng)))
    assert not np.array_equal(batch[0], variant.random_batch(4, rng)[0])


def test_random_labels_are_classes_and_random_targets_the_next_tokens():
    images, labels = get_model("vit").variant("tiny", num_classes=3).random_batch(64)
    assert images.dtype == np.uint8 and set(labels) == {0, 1, 2}
    lm = get_model("lm").variant("test", vocab=7)
    inputs, targets = lm.random_batch(8)
    assert np.array_equal(inputs[:, 1:], targets[:, :-1]) and inputs.max() < 7


def test_sizes_and_config_fields_are_checked_with_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'gpt'; choose one of: cnn, wide_cnn"):
        get_model("gpt")
    with pytest.raises(UsageError, match="unknown ViT size 'huge'"):
        get_model("vit").variant("huge")
    with pytest.raises(UsageError, match="LMConfig has no field 'width'"):
        get_model("lm").variant("test", width=3)
    with pytest.raises(UsageError, match="model 'cnn' has one size"):
        get_model("cnn").variant("small")
    with pytest.raises(UsageError, match="unknown compute dtype 'float16'"):
        get_model("cnn").variant(compute_dtype="float16")
    with pytest.raises(ValueError, match="registered already"):
        register(dataclasses.replace(get_model("cnn")))


def test_a_variant_names_its_size_and_overrides_but_not_a_callers_defaults():
    lm = get_model("lm")
    assert lm.sizes[0] == "test" and "7b" in lm.sizes
    v = lm.variant("tiny", {"remat": "full"}, depth=1)
    assert v.label == "lm-tiny,depth=1" and v.config.remat == "full" and v.config.depth == 1
    assert lm.variant("tiny", {"remat": "full"}, remat="dots").config.remat == "dots"
    assert v.pipeline_layers == 1 and v.step_flops(4) > 0
    assert get_model("vit").variant("base").step_flops(4) is None  # XLA counts the ViT's
    assert get_model("vit").variant("base").pipeline_layers is None
    assert get_model("cnn").variant(compute_dtype="bfloat16").title == "CNN (bf16 compute)"


def test_recipes_and_the_planner_take_their_models_from_the_registry():
    from experiments import mnist
    from jaxdist import plan

    assert mnist.MODELS == model_names(task="image_classification") == ("cnn", "wide_cnn", "vit")
    assert plan.MODELS == ("vit", "lm", "llama")  # those with named sizes
    cfg = dataclasses.replace(mnist.get_config(), model="vit", vit_size="tiny")
    name, build = mnist.model_builder(cfg)
    assert name == "ViT-tiny (0.14M params)" and isinstance(build(), nnx.Module)
