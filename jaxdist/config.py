"""Typed configs and the one way to override them from the command line.

An experiment's config is a frozen dataclass tree. `parse_config` turns every leaf field into a
flag named after it (`--global_batch 256`); a nested config's `name` field takes the nested
field's own name (`--optimizer adam`), and a field may name its flag itself
(`metadata={"flag": "checkpoint_every"}` on `CheckpointConfig.every`). A field's help is the docstring written under it, its
choices are its `Literal` type's values: the config class is the one place a flag is described.
Bad values exit with one line and status 2 (`EXIT_USAGE`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
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
                if flag in names:
                    raise ValueError(f"two config fields map to --{flag}")
                names[flag] = (f.name, *path)
        else:
            flag = f.metadata.get("flag") or (prefix if (f.name == "name" and prefix) else f.name)
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


def _leaf_doc(cls: type, path: tuple[str, ...]) -> str:
    """The docstring of the field at `path`; a nested config's `name` falls back to the
    docstring of the field holding the nested config."""
    owner, doc = cls, ""
    for name in path:
        doc = field_docs(owner).get(name, "") or (doc if name == "name" else "")
        owner = typing.get_type_hints(owner)[name]
    return doc


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """field -> the docstring written under it (its first paragraph, on one line), for `cls` and
    its dataclass bases; a class whose source is not available has none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                first = inspect.cleandoc(after.value.value).split("\n\n")[0]
                docs[node.target.id] = " ".join(first.split())
    return docs


def literal_choices(kind: Any) -> tuple | None:
    """The values of a `Literal[...]` type (also inside `X | None`), else None."""
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if _is_union(kind) and len(args) == 1:
        return literal_choices(args[0])
    return None


def _is_union(kind: Any) -> bool:
    import types

    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _converter(kind: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if _is_union(kind) and len(args) == 1:
        return _converter(args[0])
    if origin is typing.Literal:  # argparse checks a flag's choices; a tuple's items: `_one_of`
        return type(args[0])
    if kind is bool:
        return _parse_bool
    if origin is tuple:
        item = _one_of(args[0]) if typing.get_origin(args[0]) is typing.Literal else _converter(
            args[0])

        def comma_list(text: str) -> tuple:
            return tuple(item(t) for t in text.split(",") if t)

        comma_list.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"
        return comma_list
    return kind


def _one_of(kind: Any) -> Callable[[str], Any]:
    """A converter of one item of a `tuple[Literal[...], ...]` flag that refuses other values."""
    allowed = typing.get_args(kind)

    def one_of(text: str) -> Any:
        value = type(allowed[0])(text)
        if value not in allowed:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(map(str, allowed))}")
        return value

    return one_of


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


def flag_help(cls: type) -> dict[str, str]:
    """flag -> its help (the docstring under its field), for every flag of a config class."""
    return {flag: _leaf_doc(cls, path) for flag, path in _flag_names(cls).items()}


def replace_flags(cfg: Any, **flags: Any) -> Any:
    """`cfg` with the fields behind these flags replaced, wherever they sit in the tree:
    `replace_flags(cfg, workdir="runs/a", hang_timeout=60)`."""
    names = _flag_names(type(cfg))
    for flag, value in flags.items():
        if flag not in names:
            raise TypeError(f"{type(cfg).__name__} has no flag --{flag}")
        cfg = _replace(cfg, names[flag], value)
    return cfg


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
    parser = ArgumentParser(prog=_prog(), description=description)
    parser.add_argument("--config", default="", help="config variant, e.g. 'smoke'")
    flags = _flag_names(cls)
    groups: dict[str, Any] = {}
    for flag, path in flags.items():
        kind = _leaf_type(cls, path)
        allowed = (choices or {}).get(flag) or literal_choices(kind)
        where = parser
        if len(path) > 1:  # a component's flags under its name and what its docstring says
            if path[0] not in groups:
                component = _leaf_type(cls, path[:1])
                groups[path[0]] = parser.add_argument_group(
                    path[0], (component.__doc__ or "").strip().split("\n")[0])
            where = groups[path[0]]
        where.add_argument(
            f"--{flag}",
            type=_converter(kind),
            default=_leaf(base, path),
            choices=allowed,
            help=_with_default((help_text or {}).get(flag) or _leaf_doc(cls, path),
                               _leaf(base, path)),
            metavar=None if allowed else flag.upper(),  # choices show as {a,b}
        )
    args = parser.parse_args(argv)
    cfg = base
    for flag, path in flags.items():
        value = getattr(args, flag)
        if value != _leaf(base, path):
            cfg = _replace(cfg, path, value)
    return cfg


def _with_default(text: str, default: Any) -> str:
    """The help line with its default as one would type it (a,b for a tuple; none unset)."""
    if isinstance(default, tuple):
        shown = ",".join(str(x) for x in default)
    elif isinstance(default, bool):
        shown = str(default).lower()
    else:
        shown = "" if default is None else str(default)
    text = (text or "").replace("%", "%%")  # argparse formats help with %
    return f"{text} (default: {shown})" if shown else text or " "


def _prog() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return f"python -m {spec.name.removesuffix('.__main__')}" if spec else None
