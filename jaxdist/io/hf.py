"""Hugging Face Llama checkpoints in and out, straight into (and out of) sharded parameters.

    cfg = load_hf_config("Llama-3.2-1B", seq_len=2048)
    trainer = Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(0)), tx, llama_loss, strategy="fsdp",
                      init_params=hf_init_params("Llama-3.2-1B", cfg=cfg))
    state = trainer.init()            # the checkpoint's weights, each device reading its shard
    ...
    save_hf("out", trainer.canonical(state), cfg)   # transformers' from_pretrained reads it

A directory holds `config.json` and `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Loading builds each parameter with
`jax.make_array_from_callback`: every device's block is read from the files alone (one layer's
tensor at a time, only the rows and columns of its shard where the layout allows), so each
process reads only what its devices hold and no parameter is ever whole on one device or host.
Everything is checked before any data is read: config.json against the model, every tensor's
presence and shape. Saving gathers one layer's tensor at a time to the host, and process 0
writes the directory atomically (a temporary directory renamed into place).

The parameter <-> tensor table is `jaxdist.models.llama_hf.LLAMA_HF`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxdist.cluster import kv
from jaxdist.core.step import TrainState, path_name
from jaxdist.errors import DataError, UsageError, first_line
from jaxdist.io.safetensors_files import TensorInfo, read_header, read_slice, write_file
from jaxdist.models.llama import Llama, LlamaConfig
from jaxdist.models.llama_hf import HF_FIELDS, LLAMA_HF, HFTensor

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
Shardings = Any  # a tree of jax.sharding.Sharding like the parameters', or one for all


def load_hf_config(path: str | os.PathLike, **overrides: Any) -> LlamaConfig:
    """The model of a checkpoint directory's config.json; `overrides` set what HF does not
    record (`seq_len`, `remat`)."""
    return LlamaConfig.from_hf(_read_config(_directory(path)), **overrides)


def load_hf_params(path: str | os.PathLike, like: Any, *, shardings: Shardings = None,
                   cfg: LlamaConfig | None = None) -> Any:
    """The checkpoint's weights as `like`'s tree of parameters (`jax.Array`s, each in its
    sharding), converted to `like`'s dtypes.

    Args:
        like: the parameters' shapes and dtypes: `trainer.abstract_state().params` (whose
            leaves carry their shardings), `nnx.state(nnx.eval_shape(builder), nnx.Param)`...
        shardings: each parameter's sharding (`trainer.param_shardings`), or one for all
            (`SingleDeviceSharding(device)`); default: `like`'s own.
        cfg: the model's config, checked field by field against config.json.

    Raises:
        UsageError: one line naming a config.json field that disagrees with `cfg` or with
            `like`'s shapes, or a tensor missing from the checkpoint or of another shape.
    """
    directory = _directory(path)
    file_cfg = LlamaConfig.from_hf(_read_config(directory))
    if cfg is not None:
        _check_fields(directory, file_cfg, cfg)
    leaves = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
    _check_shapes(f"{directory / CONFIG} describes",
                  {k: tuple(x.shape) for k, x in leaves.items()}, _model_shapes(file_cfg))
    tensors = _tensor_index(directory)
    for name, x in leaves.items():
        _check_tensors(directory, name, tuple(x.shape), tensors)
    sharding_tree = _shardings_like(like, shardings)

    def build(key_path, x, sharding):
        name = path_name(key_path)
        if sharding is None:
            raise UsageError(f"parameter {name} has no sharding; pass shardings=")
        read = _block_reader(LLAMA_HF[name], tuple(x.shape), np.dtype(x.dtype), tensors)
        return jax.make_array_from_callback(tuple(x.shape), sharding, read)

    return jax.tree_util.tree_map_with_path(build, like, sharding_tree)


def hf_init_params(path: str | os.PathLike, *, cfg: LlamaConfig | None = None
                   ) -> Callable[[Any], Any]:
    """`Trainer(..., init_params=hf_init_params(path))`: the trainer's `init` (and so `fit`)
    starts from the checkpoint's weights, read into the strategy's layout."""
    return lambda like: load_hf_params(path, like, cfg=cfg)


def save_hf(path: str | os.PathLike, params: Any, cfg: LlamaConfig, *,
            dtype: Any = None, max_shard_bytes: int | None = None) -> Path:
    """Writes `params` (a parameter tree or a canonical `TrainState`, laid out by any strategy)
    as a checkpoint directory transformers reads: config.json and model.safetensors, or shards
    of at most `max_shard_bytes` (a larger tensor is a shard alone) with their index.

    Call it on every process: each parameter is gathered one layer's tensor at a time (host
    memory holds about one tensor), and process 0 writes into a temporary directory that
    replaces `path` whole once complete (files put there before are gone). `dtype` (e.g. `jnp.bfloat16`) converts on the host; default:
    the parameters' own."""
    params = params.params if isinstance(params, TrainState) else params
    arrays = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    _check_shapes("cfg describes", {k: tuple(np.shape(x)) for k, x in arrays.items()},
                  _model_shapes(cfg))
    entries = _entries(arrays, dtype)
    shards = _shards(entries, max_shard_bytes)
    path = Path(path).absolute()
    host = (_to_host(arrays[e.param], e.layer, e.dtype) for e in entries)
    outcome: dict = {"ok": True}
    if jax.process_index() == 0:
        try:
            _write(path, cfg, entries, shards, host)
        except (OSError, UsageError) as e:
            outcome = {"ok": False, "message": f"saving {path} failed: {first_line(e)}"}
            for _ in host:  # the other processes still gather the rest
                pass
    else:
        for _ in host:  # the gathers are collective: take part in each
            pass
    outcome = kv.allgather("save-hf", outcome)[0]
    if not outcome["ok"]:
        raise UsageError(outcome["message"])
    return path


# -- reading


def _directory(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such checkpoint directory")
    return directory


def _read_config(directory: Path) -> dict:
    file = directory / CONFIG
    if not file.is_file():
        raise UsageError(f"{directory} has no {CONFIG}: not a Hugging Face checkpoint directory")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: not readable JSON ({first_line(e)})") from None


def _check_fields(directory: Path, file_cfg: LlamaConfig, cfg: LlamaConfig) -> None:
    for field, hf_name in HF_FIELDS.items():
        theirs, ours = getattr(file_cfg, field), getattr(cfg, field)
        if theirs != ours:
            raise UsageError(f"{directory / CONFIG}: {hf_name} is {theirs!r} but the model's "
                             f"{field} is {ours!r}")


def _model_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape of the Llama of `cfg`, without allocating one."""
    params = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return {path_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_shapes(source: str, got: dict[str, tuple], want: dict[str, tuple]) -> None:
    """One line naming the first parameter whose shape (or presence) differs."""
    for name in sorted(got.keys() | want.keys()):
        if name not in LLAMA_HF:
            raise UsageError(f"parameter {name} is not a Llama parameter (no Hugging Face name)")
        if got.get(name) != want.get(name):
            described = want.get(name, "absent")
            raise UsageError(f"{source} {name} as {described}, the parameters have "
                             f"{got.get(name, 'none')}")


def _tensor_index(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, from the file headers (no data is read)."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{directory / INDEX}: no readable weight_map ({first_line(e)})"
                            ) from None
        headers = {f: read_header(_shard_file(directory, f)) for f in set(weight_map.values())}
        missing = [n for n, f in weight_map.items() if n not in headers[f]]
        if missing:
            raise DataError(f"{directory / INDEX} places {missing[0]} in {weight_map[missing[0]]}"
                            f", which does not hold it")
        return {name: headers[f][name] for name, f in weight_map.items()}
    if (directory / SINGLE).is_file():
        return read_header(directory / SINGLE)
    raise UsageError(f"{directory} has neither {SINGLE} nor {INDEX} (only safetensors "
                     f"checkpoints are read)")


def _shard_file(directory: Path, name: str) -> Path:
    file = directory / name
    if not file.is_file():
        raise DataError(f"{directory / INDEX} lists {name}, which is missing")
    return file


def _check_tensors(directory: Path, param: str, shape: tuple[int, ...],
                   tensors: dict[str, TensorInfo]) -> None:
    spec = LLAMA_HF[param]
    layers = range(shape[0]) if spec.per_layer else [None]
    want = spec.hf_shape(shape[1:] if spec.per_layer else shape)
    for layer in layers:
        name = spec.hf_name(layer)
        if name not in tensors:
            raise UsageError(f"{directory} has no tensor {name} (the model's {param})")
        if tensors[name].shape != want:
            raise UsageError(f"{directory}: tensor {name} has shape {tensors[name].shape}, the "
                             f"model's {param} needs {want}")


def _shardings_like(like: Any, shardings: Shardings) -> Any:
    if shardings is None:
        return jax.tree.map(lambda x: getattr(x, "sharding", None), like)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, like)
    return shardings


def _block_reader(spec: HFTensor, shape: tuple[int, ...], dtype: np.dtype,
                  tensors: dict[str, TensorInfo]) -> Callable[[tuple], np.ndarray]:
    """`make_array_from_callback`'s callback: the block at a device's index, read from the
    files; one read per distinct block (devices holding replicas get the same one)."""
    inner = shape[1:] if spec.per_layer else shape
    blocks: dict[tuple, np.ndarray] = {}

    def tensor_block(name: str, index: tuple[slice, ...]) -> np.ndarray:
        window, finish = spec.window(index, inner)
        return finish(read_slice(tensors[name], window))

    def read(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            if spec.per_layer:
                block = np.stack([tensor_block(spec.hf_name(layer), index[1:])
                                  for layer in range(index[0].start, index[0].stop)])
            else:
                block = tensor_block(spec.hf_name(), index)
            blocks[key] = block.astype(dtype, copy=False)
        return blocks[key]

    return read


# -- writing


class _Entry(NamedTuple):
    """One HF tensor to write: its name, the parameter and layer it comes from, shape, dtype."""

    name: str
    param: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape))


def _entries(arrays: dict[str, Any], dtype: Any) -> list[_Entry]:
    """The tensors in HF's order: the embedding, layer by layer, the final norm, the head."""
    def entry(param: str, layer: int | None) -> _Entry:
        spec, x = LLAMA_HF[param], arrays[param]
        shape = spec.hf_shape(tuple(np.shape(x))[1:] if spec.per_layer else np.shape(x))
        return _Entry(spec.hf_name(layer), param, layer, shape, np.dtype(dtype or x.dtype))

    stacked = [p for p in LLAMA_HF if LLAMA_HF[p].per_layer and p in arrays]
    depth = np.shape(arrays[stacked[0]])[0]
    return [entry("embedding", None),
            *(entry(p, layer) for layer in range(depth) for p in stacked),
            *(entry(p, None) for p in ("final_norm", "unembed") if p in arrays)]


def _shards(entries: list[_Entry], max_bytes: int | None) -> list[list[_Entry]]:
    """Consecutive groups of at most `max_bytes` each (a larger tensor alone)."""
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards: list[list[_Entry]] = [[]]
    for e in entries:
        size = sum(x.nbytes for x in shards[-1])
        if shards[-1] and max_bytes is not None and size + e.nbytes > max_bytes:
            shards.append([])
        shards[-1].append(e)
    return shards


_take_layer = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))


def _to_host(x: Any, layer: int | None, dtype: np.dtype) -> np.ndarray:
    """One layer of `x` (all of it for `layer` None) as a numpy array, gathered from every
    process when its shards are not all here."""
    if isinstance(x, jax.Array):
        part = x if layer is None else _take_layer(x, layer)
        if part.is_fully_addressable:
            host = np.asarray(jax.device_get(part))
        else:
            host = np.asarray(multihost_utils.process_allgather(part, tiled=True))
    else:
        host = np.asarray(x) if layer is None else np.asarray(x)[layer]
    return host.astype(dtype, copy=False)


def _write(path: Path, cfg: LlamaConfig, entries: list[_Entry], shards: list[list[_Entry]],
           host: Iterator[np.ndarray]) -> None:
    """The directory, written beside `path` and renamed into place when complete."""
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = {**cfg.to_hf(), "torch_dtype": entries[0].dtype.name}
    (partial / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        tensors = (LLAMA_HF[e.param].to_hf(x) for e, x in zip(shard, itertools.islice(
            host, len(shard))))
        write_file(partial / name, {e.name: (e.shape, e.dtype) for e in shard}, tensors,
                   metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: n for n, shard in zip(names, shards) for e in shard}}
        (partial / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _replace_dir(partial, path)


def _replace_dir(new: Path, path: Path) -> None:
    """`new` renamed to `path`; an existing `path` is renamed aside first and then removed, so
    `path` is never a half-written directory."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")
    if not path.exists():
        os.replace(new, path)
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old)
