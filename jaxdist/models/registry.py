"""The model registry: every model of the zoo listed once, by name, for recipes, the planner and
the benchmarks alike (torchtitan's `protocols/model_spec.py`, small).

A `ModelSpec` says how to configure a model (its named sizes and config fields), build it from a
config and a seed, what one batch of it looks like (and a random one, for benchmarks to time
steps on), and how it is scored (loss and evaluation functions), with its parameter count and,
where the model knows them, its training FLOPs and the layer stack a pipeline splits.
`ModelSpec.variant(size, **overrides)` fixes a size and config: a `ModelVariant` builds the module
and describes its batches.

    >>> lm = get_model("lm").variant("test", depth=2)
    >>> lm.label, lm.param_count, [x.shape for x in lm.batch(8)]
    ('lm-test,depth=2', 24736, [(8, 32), (8, 32)])
    >>> model_names(task="image_classification")
    ('cnn', 'wide_cnn', 'vit')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdist.errors import UsageError
from jaxdist.models import llama, lm, vit
from jaxdist.models.classification import mnist_eval, mnist_loss
from jaxdist.models.cnn import MnistCNN
from jaxdist.models.wide_cnn import WideCNN

TASKS = ("image_classification", "language_modeling")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to configure, build, feed and score one model family.

    Attributes:
        name: the registry's key: the recipes' and the planner's `--model` value.
        task: what its batches and losses are, one of `TASKS`.
        make_config: `(size, **fields) -> config` (a frozen dataclass); UsageError for an unknown
            size or a bad value. Models without named sizes take size None.
        make_module: `(config, rngs) -> nnx.Module`.
        example_batch: `(config, n) -> tuple of ShapeDtypeStructs`: a training batch of n
            examples (its evaluation batch adds a float32 mask of n).
        random_batch: `(config, n, rng) -> tuple of numpy arrays`: a training batch of n
            examples like `example_batch`, of random values the model takes, drawn from `rng`
            (a `np.random.Generator`).
        loss_fn: the Trainer's loss, `loss_fn(model, batch) -> (loss, metrics)`.
        eval_fn: sums over an evaluation batch, `eval_fn(model, batch + (mask,))`; None: none.
        title: `variant -> str`, the name a recipe prints ("ViT-tiny (0.14M params)").
        inputs: `config -> str`, what one example is, in words.
        sizes: the named sizes, smallest first; empty when the model has one shape.
        param_count: `config -> int` from shapes alone; None: counted from the abstract module.
        pipeline_layers: `config -> int | None`, the depth of the layer stack a pipeline splits
            over stages; None: the model has none.
        train_flops: `(config, n) -> float`, training FLOPs of n examples over all devices;
            None: only XLA's cost analysis of the compiled step knows them.
    """

    name: str
    task: str
    make_config: Callable[..., Any]
    make_module: Callable[[Any, nnx.Rngs], Any]
    example_batch: Callable[[Any, int], tuple]
    loss_fn: Callable
    eval_fn: Callable | None
    title: Callable[[ModelVariant], str]
    inputs: Callable[[Any], str]
    random_batch: Callable[[Any, int, np.random.Generator], tuple]
    sizes: tuple[str, ...] = ()
    param_count: Callable[[Any], int] | None = None
    pipeline_layers: Callable[[Any], int | None] = lambda config: None
    train_flops: Callable[[Any, int], float] | None = None

    def config(self, size: str | None = None, **fields: Any) -> Any:
        """The config of `size` (default: the smallest) with `fields` replaced; UsageError for an
        unknown size or field."""
        if self.sizes and size is None:
            size = self.sizes[0]
        if not self.sizes and size is not None:
            raise UsageError(f"model {self.name!r} has one size, got size {size!r}")
        base = self.make_config(size)
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(base)})
        if unknown:
            raise UsageError(f"{type(base).__name__} has no field {unknown[0]!r}")
        return self.make_config(size, **fields) if fields else base

    def variant(self, size: str | None = None, defaults: Mapping[str, Any] | None = None,
                **fields: Any) -> ModelVariant:
        """This model at `size` (default: the smallest) with config `fields` replaced.
        `defaults` are fields a caller sets unless `fields` names them (the planner's LM remat),
        left out of the label."""
        config = self.config(size, **{**(defaults or {}), **fields})
        if self.sizes and size is None:
            size = self.sizes[0]
        label = self.name + (f"-{size}" if size else "") + "".join(
            f",{k}={v}" for k, v in fields.items())
        return ModelVariant(self, size or "", config, label)


@dataclasses.dataclass(frozen=True)
class ModelVariant:
    """One registered model at one size and config.

    Attributes:
        spec: its `ModelSpec`.
        size: the named size; "" for a model with one shape.
        config: the model's config.
        label: name, size and the fields replaced, e.g. "vit-base" or "lm-tiny,depth=1".
    """

    spec: ModelSpec
    size: str
    config: Any
    label: str

    @property
    def loss_fn(self) -> Callable:
        return self.spec.loss_fn

    @property
    def eval_fn(self) -> Callable | None:
        return self.spec.eval_fn

    @property
    def title(self) -> str:
        return self.spec.title(self)

    @property
    def inputs(self) -> str:
        return self.spec.inputs(self.config)

    @property
    def pipeline_layers(self) -> int | None:
        return self.spec.pipeline_layers(self.config)

    @property
    def param_count(self) -> int:
        if self.spec.param_count is not None:
            return self.spec.param_count(self.config)
        model = nnx.eval_shape(self.model_fn())
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    def build(self, seed: int = 0) -> Any:
        """The module, its parameters initialized from `seed`."""
        return self.spec.make_module(self.config, nnx.Rngs(seed))

    def model_fn(self, seed: int = 0) -> Callable[[], Any]:
        """`build` as a function of nothing: what a trainer takes to create the model sharded
        (or abstractly, for the planner)."""
        return functools.partial(self.build, seed)

    def batch(self, n: int) -> tuple:
        """ShapeDtypeStructs of a training batch of `n` examples (no sharding)."""
        return self.spec.example_batch(self.config, n)

    def random_batch(self, n: int, rng: np.random.Generator | int = 0) -> tuple:
        """A training batch of `n` examples of random values in host memory, drawn from `rng` (a
        generator, or a seed): what a benchmark times steps on when it leaves out the input
        pipeline. Images are uint8 with labels below the number of classes; the LM's targets are
        its inputs shifted by one.

            >>> [x.shape for x in get_model("cnn").variant().random_batch(4, 0)]
            [(4, 28, 28, 1), (4,)]
        """
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        return self.spec.random_batch(self.config, n, rng)

    def eval_batch(self, n: int) -> tuple:
        """ShapeDtypeStructs of an evaluation batch: the training batch and a float32 mask."""
        return (*self.batch(n), jax.ShapeDtypeStruct((n,), np.float32))

    def step_flops(self, n: int) -> float | None:
        """Training FLOPs of a step of `n` examples, all devices together; None where only XLA's
        cost analysis of the compiled step knows them."""
        flops = self.spec.train_flops
        return None if flops is None else flops(self.config, n)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds `spec` under its name; ValueError when the name is taken or the task unknown."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered already")
    if spec.task not in TASKS:
        raise ValueError(f"model {spec.name!r}: unknown task {spec.task!r}; one of {TASKS}")
    _REGISTRY[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    """The registered `ModelSpec` of `name`; UsageError when there is none."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def model_names(task: str | None = None) -> tuple[str, ...]:
    """The registered names, in registration order; only those of `task` when given."""
    return tuple(name for name, spec in _REGISTRY.items() if task in (None, spec.task))


# ---------------------------------------------------------------------------------------------
# The zoo


def _images(config: Any, n: int) -> tuple:
    """uint8 NHWC images and int32 labels."""
    size, channels = getattr(config, "image_size", 28), getattr(config, "channels", 1)
    return (jax.ShapeDtypeStruct((n, size, size, channels), np.uint8),
            jax.ShapeDtypeStruct((n,), np.int32))


def _random_images(config: Any, n: int, rng: np.random.Generator) -> tuple:
    """Random pixels, and labels below the number of classes (MNIST's 10 by default)."""
    images, _ = _images(config, n)
    return (rng.integers(0, 256, images.shape, dtype=np.uint8),
            rng.integers(0, getattr(config, "num_classes", 10), n).astype(np.int32))


def _images_in_words(config: Any) -> str:
    size, channels = getattr(config, "image_size", 28), getattr(config, "channels", 1)
    return f"uint8 {size}x{size}x{channels} images, int32 labels"


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """The classic MNIST CNN's one option."""

    compute_dtype: str = "float32"  # or bfloat16: bfloat16 compute, float32 master weights


@dataclasses.dataclass(frozen=True)
class WideCNNConfig:
    """The wide CNN's widths: convolution channels and the hidden layer."""

    c1: int = 64
    c2: int = 128
    hidden: int = 512


def _cnn_config(size: None, **fields: Any) -> CNNConfig:
    config = CNNConfig(**fields)
    if config.compute_dtype not in ("float32", "bfloat16"):
        raise UsageError(f"unknown compute dtype {config.compute_dtype!r}; the CNN computes in "
                         f"float32 or bfloat16")
    return config


def _cnn(config: CNNConfig, rngs: nnx.Rngs) -> MnistCNN:
    dtype = None if config.compute_dtype == "float32" else getattr(jnp, config.compute_dtype)
    return MnistCNN(rngs=rngs, dtype=dtype)


def _tokens(config: lm.LMConfig, n: int) -> tuple:
    """(inputs, targets): int32 tokens, the targets shifted by one."""
    tokens = jax.ShapeDtypeStruct((n, config.seq_len), np.int32)
    return tokens, tokens


def _random_tokens(config: lm.LMConfig, n: int, rng: np.random.Generator) -> tuple:
    """Random tokens of the vocabulary; the targets are the inputs shifted by one."""
    tokens = rng.integers(0, config.vocab, (n, config.seq_len + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def _with_params(title: str) -> Callable[[ModelVariant], str]:
    return lambda v: f"{title}-{v.size} ({v.param_count / 1e6:.2f}M params)"


register(ModelSpec(
    "cnn", "image_classification", _cnn_config, _cnn, _images, mnist_loss, mnist_eval,
    title=lambda v: "CNN" + (" (bf16 compute)" if v.config.compute_dtype == "bfloat16" else ""),
    inputs=_images_in_words, random_batch=_random_images))
register(ModelSpec(
    "wide_cnn", "image_classification", lambda size, **fields: WideCNNConfig(**fields),
    lambda config, rngs: WideCNN(config.c1, config.c2, config.hidden, rngs=rngs), _images,
    mnist_loss, mnist_eval, title=lambda v: "wide CNN", inputs=_images_in_words,
    random_batch=_random_images))
register(ModelSpec(
    "vit", "image_classification", vit.vit_config,
    lambda config, rngs: vit.ViT(config, rngs=rngs), _images, mnist_loss, mnist_eval,
    title=_with_params("ViT"), inputs=_images_in_words, random_batch=_random_images,
    sizes=tuple(vit.VIT_SIZES), param_count=vit.param_count))
register(ModelSpec(
    "lm", "language_modeling", lm.lm_config, lambda config, rngs: lm.GPT(config, rngs=rngs),
    _tokens, lm.lm_loss, lm.lm_eval, title=_with_params("LM"),
    inputs=lambda c: f"sequences of {c.seq_len} int32 tokens, inputs and targets",
    random_batch=_random_tokens, sizes=tuple(lm.LM_SIZES), param_count=lm.param_count,
    pipeline_layers=lambda config: config.depth,
    train_flops=lambda config, n: lm.train_flops(config, n * config.seq_len)))
register(ModelSpec(
    "llama", "language_modeling", llama.llama_config,
    lambda config, rngs: llama.Llama(config, rngs=rngs), _tokens, llama.llama_loss,
    llama.llama_eval, title=_with_params("Llama"),
    inputs=lambda c: f"sequences of {c.seq_len} int32 tokens, inputs and targets",
    random_batch=_random_tokens, sizes=tuple(llama.LLAMA_SIZES),
    param_count=llama.param_count, pipeline_layers=lambda config: config.depth,
    train_flops=lambda config, n: llama.train_flops(config, n * config.seq_len)))
