"""A stage's options are declared once: its dataclass makes its command line, so the command
line's defaults are the dataclass's, and every option given is the field set."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import pytest

from align.engine.options import add_options, option, options_from
from common.arguments import positive

CONVERTED = [("data", "DataOptions"), ("predict", "PredictOptions"), ("metric", "MetricOptions"), ("forward", "ForwardOptions"),
             ("loss", "LossOptions"), ("backward", "BackwardOptions"), ("train", "TrainOptions")]


@dataclasses.dataclass
class Example:
    steps: int = option(10, "steps", type=positive)
    name: str = option("pair", "report stem")
    layers: bool = option(True, "skip the layers", flag="--no-layers")
    cache: bool = option(False, "keep the reference side")
    folder: Path = Path("build")  # not on the command line


def test_fields_become_options_with_their_defaults_and_types():
    parser = add_options(argparse.ArgumentParser(), Example)
    assert options_from(Example, parser.parse_args([])) == Example()
    given = options_from(Example, parser.parse_args(["--steps", "3", "--name", "x", "--no-layers", "--cache"]),
                         folder=Path("elsewhere"))
    assert given == Example(steps=3, name="x", layers=False, cache=True, folder=Path("elsewhere"))
    assert "--folder" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "0"])


def test_a_switch_on_by_default_needs_a_flag_that_turns_it_off():
    @dataclasses.dataclass
    class Wrong:
        layers: bool = option(True, "the layers")

    with pytest.raises(TypeError, match="Wrong.layers"):
        add_options(argparse.ArgumentParser(), Wrong)


@pytest.mark.parametrize("stage, name", CONVERTED)
def test_a_stage_without_options_runs_with_its_dataclass_defaults(stage, name):
    from align.engine.cli import options_parser

    options_class = getattr(importlib.import_module(f"align.{stage}.stage"), name)
    args = options_parser(stage, "", options_class).parse_args([])
    assert options_from(options_class, args) == options_class()
