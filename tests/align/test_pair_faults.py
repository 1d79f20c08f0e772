"""`python -m align.pair` with builders that fail and name maps that do not fit: one line each."""
from __future__ import annotations

import json

import pytest

from align.engine.weights import NameMap
from align.pair.__main__ import main as pair_main
from tests.align.test_isolate import TorchBlock

BLOCK = ["--torch", "tests.align.pair_builders:block_torch", "--paddle", "tests.align.pair_builders:block_paddle",
         "--shape", "1x3x8x8"]


@pytest.mark.parametrize("side", ["--torch", "--paddle"])
@pytest.mark.parametrize("builder, exception", [("raising", "RuntimeError: cannot open /nowhere/weights.pth"),
                                                ("nested_failure", "KeyError: 'backbone'")])
def test_a_builder_that_raises_is_one_line_naming_it(tmp_path, capsys, side, builder, exception):
    argv = list(BLOCK)
    argv[argv.index(side) + 1] = f"tests.align.pair_builders:{builder}"
    assert pair_main(argv + ["--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {side} tests.align.pair_builders:{builder}: the builder raised {exception}"]
    assert not (tmp_path / "r").exists()


def test_a_builder_failure_shows_its_traceback_with_v(tmp_path, capsys):
    argv = list(BLOCK)
    argv[1] = "tests.align.pair_builders:raising"
    assert pair_main(argv + ["--reports", str(tmp_path), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("cannot open /nowhere/weights.pth")' in err
    assert err.rstrip().splitlines()[-1].startswith("error: --torch tests.align.pair_builders:raising:")


def test_a_module_rule_matches_with_or_without_its_trailing_dot():
    for rule in ("fc.", "fc"):
        names = NameMap([(rule, "head." if rule.endswith(".") else "head")])
        assert names.layer("fc") == "head" and names.tensor("fc.weight") == "head.weight"
        names.check(TorchBlock())
    # A rule without the dot is a plain prefix, as before: it also renames fc2.
    assert NameMap([("fc", "head")]).layer("fc2") == "head2"
    assert NameMap([("fc.", "head.")]).layer("fc2") == "fc2"


def test_a_rule_that_matches_no_module_is_an_error_naming_it():
    with pytest.raises(ValueError) as caught:
        NameMap([("fc.", "head."), ("backbone.", ""), ("conv1", "stem")]).check(TorchBlock())
    message = str(caught.value)
    assert "['backbone.', '']" in message and "fc." not in message and "conv1" not in message
    # A rule shadowed by an earlier one selects nothing either.
    with pytest.raises(ValueError, match=r"\['fc\.', 'b\.'\] \(closest module: 'fc'\) matches no module"):
        NameMap([("fc", "a"), ("fc.", "b.")]).check(TorchBlock())
    with pytest.raises(ValueError, match=r"\['bn3\.', 'x\.'\] \(closest module: 'bn\d'\)"):
        NameMap([("bn3.", "x.")]).check(TorchBlock())


def test_the_pair_command_refuses_a_map_with_an_unused_rule(tmp_path, capsys):
    name_map = tmp_path / "names.json"
    name_map.write_text(json.dumps({"prefixes": [["classifier.", "fc."]]}))
    assert pair_main(BLOCK + ["--map", str(name_map), "--reports", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --map {name_map}: ['classifier.', 'fc.'] matches no module of the torch model"]
    assert not (tmp_path / "r").exists()
    # The same block passes with a map whose rule applies.
    name_map.write_text(json.dumps({"prefixes": [["fc.", "fc."]]}))
    assert pair_main(BLOCK + ["--map", str(name_map), "--reports", str(tmp_path / "r")]) == 0
