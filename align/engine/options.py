"""A stage's options, declared once: a dataclass whose fields carry their command-line form.

    @dataclass
    class ForwardOptions:
        shape: str = option("2x3x800x1344", "input NxCxHxW", type=tensor_shape(4, channels=3))
        rel_tol: float = option(1e-5, "bound on max|diff| / max|ref|", type=non_negative_float)
        layers: bool = option(True, "skip the layer-by-layer capture", flag="--no-layers")
        build_dir: Path = Path("build")  # not on the command line

`add_options` puts one argument per ``option`` field on a parser (``--rel-tol``; its default
and type from the field, so a default is written in one place), and `options_from` builds the
dataclass from the parsed arguments. A boolean field is a switch: ``--name`` turns a False
default on; a True default needs a ``flag`` that turns it off (``--no-layers``). Fields
declared without ``option`` keep their default and are set from code only.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from common.arguments import non_negative

T = TypeVar("T")

_KEY = "command_line"


def option(default: Any, help: str = "", *, type: Optional[Callable[[str], Any]] = None,
           flag: Optional[str] = None, choices: Optional[Sequence[Any]] = None,
           metavar: Optional[str] = None, required: bool = False, aliases: Sequence[str] = (),
           append: bool = False) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring).

    Args:
        default: the field's default and the option's.
        help: the option's help; ``%(default)s`` shows the default.
        type: the argparse type that reads and checks the text (`common.arguments`).
        flag: the option's name when it is not ``--`` + the field's name with dashes.
        append: the option may be given several times; the field is the list of its values
            (the default when it is not given).
        aliases: other names of the same option (``--train-steps`` beside ``--steps``).
        choices, metavar, required: as argparse takes them.
    """
    spec = {"help": help, "type": type, "flag": flag, "choices": choices, "metavar": metavar, "required": required,
            "aliases": tuple(aliases), "append": append}
    return dataclasses.field(default=default, metadata={_KEY: spec})


def add_options(parser: argparse.ArgumentParser, options_class: type, *,
                skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Add an argument to ``parser`` for every ``option`` field of ``options_class`` (in field
    order) but those named in ``skip``; returns the parser."""
    for f in dataclasses.fields(options_class):
        spec = f.metadata.get(_KEY)
        if spec is None or f.name in skip:
            continue
        flag = spec["flag"] or "--" + f.name.replace("_", "-")
        if f.default is False or f.default is True:
            if f.default is True and not spec["flag"]:
                raise TypeError(f"{options_class.__name__}.{f.name}: a switch that is on by default "
                                "needs a flag that turns it off")
            parser.add_argument(flag, dest=f.name, help=spec["help"],
                                action="store_false" if f.default else "store_true")
            continue
        extra = {k: spec[k] for k in ("choices", "metavar", "required") if spec[k]}
        if spec.get("append"):
            extra["action"] = "append"
        parser.add_argument(flag, *spec.get("aliases", ()), dest=f.name, default=f.default, type=spec["type"],
                            help=spec["help"], **extra)
    return parser


def options_from(options_class: type[T], args: argparse.Namespace, **values: Any) -> T:
    """``options_class`` with every ``option`` field taken from ``args`` (as `add_options`
    added them) and ``values`` for the others or instead of those."""
    taken = {f.name: getattr(args, f.name) for f in dataclasses.fields(options_class)
             if _KEY in f.metadata and hasattr(args, f.name)}
    return options_class(**{**taken, **values})


# The options every stage of a client has, declared once for all of them.

def seed_option(help: str = "seed of the inputs (default %(default)s)") -> Any:
    return option(0, help, type=non_negative)


def reports_option() -> Any:
    return option(Path("reports"), "where the reports go (default %(default)s)", type=Path)


def build_dir_option(default: Path, help: str = "where inputs made once are kept (default %(default)s)") -> Any:
    return option(Path(default), help, type=Path)


def cache_option() -> Any:
    return option(False, "keep the reference side's results in <build-dir>/cache and reuse them when nothing "
                         "they depend on changed")


def fresh_option() -> Any:
    return option(False, "with --cache: recompute the reference side regardless")


def same_option(options_class: type, name: str) -> Any:
    """A new field declaring option ``name`` exactly as ``options_class`` declares it (default,
    help, type, flag): a stage that takes another stage's options reuses their one declaration."""
    declared = {f.name: f for f in dataclasses.fields(options_class)}[name]
    if _KEY not in declared.metadata:
        raise TypeError(f"{options_class.__name__}.{name} is not a command-line option")
    return dataclasses.field(default=declared.default, metadata=declared.metadata)
