"""One stage list: the Makefile's targets, `make align`'s order and the report index all read align/ghm/stages.txt."""
from __future__ import annotations

import importlib
import subprocess

from align.ghm.suite import STAGE_ORDER
from tests.paths import ROOT


def _listed() -> list[tuple[str, str]]:
    lines = (ROOT / "align" / "ghm" / "stages.txt").read_text().splitlines()
    return [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]


def test_the_makefile_and_the_index_read_the_same_list():
    done = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "print-stages: ; @echo $(STAGES)",
                           "print-stages"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [stage for stage, _ in _listed()]
    assert list(STAGE_ORDER) == [report for _, report in _listed()]
    makefile = (ROOT / "Makefile").read_text()
    for stage, _ in _listed():
        assert f"\nalign-{stage}:" in makefile
        importlib.import_module(f"align.{stage}.__main__")


def test_each_stage_writes_the_report_the_list_names():
    from align.train.stage import STAGE

    assert ("train", STAGE) in _listed()
    assert all(stage == report for stage, report in _listed() if stage != "train")
