"""Typed configs and the one way to override them from the command line.

An experiment's config is a frozen dataclass tree. `parse_config` turns every leaf field into a
flag named after it (`--global_batch 256`); a nested config's `name` field takes the nested
field's own name (`--optimizer adam`). Bad values exit with one line and status 2 (`EXIT_USAGE`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Sequence

from jaxdist.errors import EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad flags in one line and exit 2 (`EXIT_USAGE`, final), not usage + error:
    every command line of the project uses it, so a typo reads the same everywhere."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _flag_names(cls: type, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """flag -> path of field names, for every leaf of the dataclass tree."""
    names: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            for flag, path in _flag_names(kind, f.name).items():
                names[flag] = (f.name, *path)
        else:
            flag = prefix if (f.name == "name" and prefix) else f.name
            if flag in names:
                raise ValueError(f"two config fields map to --{flag}")
            names[flag] = (f.name,)
    return names


def _leaf(cfg: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _leaf_type(cls: type, path: tuple[str, ...]) -> Any:
    for name in path:
        cls = typing.get_type_hints(cls)[name]
    return cls


def _converter(kind: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _converter(args[0])
    if kind is bool:
        return _parse_bool
    if origin is tuple:
        item = _converter(args[0])
        return lambda text: tuple(item(t) for t in text.split(",") if t)
    return kind


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _replace(cfg: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    inner = _replace(getattr(cfg, path[0]), path[1:], value)
    return dataclasses.replace(cfg, **{path[0]: inner})


def parse_config(
    get_config: Callable[[str], Any],
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    choices: dict[str, Sequence[str]] | None = None,
    help_text: dict[str, str] | None = None,
) -> Any:
    """`get_config(variant)` overridden by flags; `--config smoke` picks the variant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    try:
        base = get_config(known.config)
    except ValueError as e:
        ArgumentParser(prog=_prog()).error(str(e))
    cls = type(base)
    parser = ArgumentParser(prog=_prog(), description=description,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="config variant, e.g. 'smoke'")
    flags = _flag_names(cls)
    for flag, path in flags.items():
        parser.add_argument(
            f"--{flag}",
            type=_converter(_leaf_type(cls, path)),
            default=_leaf(base, path),
            choices=(choices or {}).get(flag),
            help=(help_text or {}).get(flag, " "),
            metavar=flag.upper(),
        )
    args = parser.parse_args(argv)
    cfg = base
    for flag, path in flags.items():
        value = getattr(args, flag)
        if value != _leaf(base, path):
            cfg = _replace(cfg, path, value)
    return cfg


def _prog() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return f"python -m {spec.name}" if spec else None
