"""The layout of the stage pages: verdict, then the stage's figures, then the tables.

A reviewer must see first the picture that tells whether and where the two
frameworks part. The pages are built here from results shaped like each
stage's (with the stages' own figure functions); the loss and forward stages
are also run end to end on small inputs.
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest

from align.engine.compare import diff_arrays
from align.engine.report import FOLD_ROWS, StageResult, render_stage_html, write_stage_report
from align.ghm.pair import LEVELS
from align.loss.stage import density_histograms
from align.engine.figures import loss_curves_png


class Tags(HTMLParser):
    """The start tags of a page in document order, as ``(tag, attributes)``."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def first(self, tag: str, css_class: str | None = None) -> int:
        return next(i for i, (t, a) in enumerate(self.tags)
                    if t == tag and (css_class is None or css_class in (a.get("class") or "").split()))

    def count(self, tag: str) -> int:
        return sum(t == tag for t, _ in self.tags)


def assert_figures_lead(html: str, figures: int) -> Tags:
    """The verdict banner, then ``figures`` figures, and only then the first table."""
    tags = Tags(html)
    banner, figure, table = tags.first("div", "banner"), tags.first("figure"), tags.first("table")
    assert banner < figure < table
    assert tags.count("figure") == figures
    assert all(i < table for i, (t, _) in enumerate(tags.tags) if t == "figure")
    return tags


def rows(n: int, failing: int | None = None):
    return [diff_arrays(f"row.{i}", np.ones(3), np.ones(3) * (2.0 if i == failing else 1.0), rel_tol=1e-5)
            for i in range(n)]


def layer_rows(failing: int | None = None):
    names = [f"backbone.layer{i}" for i in range(30)] + [f"neck.conv{i}" for i in range(4)] + \
        [f"head.conv{i}" for i in range(10)]
    return [diff_arrays(name, np.ones(3), np.ones(3) * (1 + (1e-3 if failing is not None and i >= failing else 1e-7)),
                        rel_tol=1e-5) for i, name in enumerate(names)]


def recorder(counts_per_call, bins: int):
    edges = np.linspace(0, 1, bins + 1).astype(np.float32)
    return SimpleNamespace(counts=[np.asarray(c, np.int64) for c in counts_per_call], edges=lambda: edges)


def ghm_recorders(differ_at: int | None = None):
    rng = np.random.default_rng(0)
    out = {}
    for loss, bins in (("GHM-C", 30), ("GHM-R", 10)):
        reference = [rng.integers(0, 10 ** 5, bins) for _ in range(2 * len(LEVELS))]
        ours = [c.copy() for c in reference]
        if differ_at is not None:
            ours[differ_at][3] += 1
        ours[len(LEVELS) - 1][:] = reference[len(LEVELS) - 1][:] = 0  # a level without an element
        out[loss] = (recorder(reference, bins), recorder(ours, bins))
    return out


def stage_result(stage: str, **kw) -> StageResult:
    return StageResult(stage=stage, title=stage, passed=True, tensors=kw.pop("tensors", rows(5)),
                       thresholds={"rel_max": 1e-5}, **kw)


PAGES = ("forward", "forward isolated", "loss", "backward", "train")


def page(name: str) -> tuple[StageResult, int]:
    """A page as the stage ``name`` builds it, with its number of lead figures."""
    if name == "forward":
        return stage_result("forward", tensors=rows(19), layers=layer_rows()), 1
    if name == "forward isolated":
        return stage_result("forward", tensors=rows(19), layers=layer_rows(5), accumulated_layers=layer_rows(5)), 1
    if name == "loss":
        return stage_result("loss", tensors=rows(153), figures=density_histograms(ghm_recorders())), len(LEVELS)
    if name == "backward":
        figure = loss_curves_png([2.0, 1.9, 1.8], [2.0, 1.9, 1.8 + 1e-12], 1e-4, "float64",
                                 extra=("float32", [2.0, 1.9, 1.8], [2.0, 1.9, 1.8001]), names=("mmdet", "paddle"),
                                 step="step")
        return stage_result("backward", tensors=rows(700),
                            extra_tables=[("Per step", ["step", "loss rel"], [[1, 1e-9], [2, 1e-8]])],
                            figures=[("Total loss per step", figure)]), 1
    curves = loss_curves_png([2.0, 1.9], [2.0, 1.9 + 1e-9], 1e-4, "float64",
                             extra=("float32", [2.0, 1.9], [2.0, 1.9001]))
    return stage_result("train_align", tensors=rows(20), figures=[("curves", curves)]), 1


@pytest.mark.parametrize("name", PAGES)
def test_the_lead_figures_come_before_the_first_table(name):
    result, figures = page(name)
    assert_figures_lead(render_stage_html(result), figures)


def test_a_page_without_figures_opens_with_its_verdict_then_its_tables():
    tags = Tags(render_stage_html(stage_result("metric")))
    assert tags.count("figure") == 0 and tags.first("div", "banner") < tags.first("table")


def test_the_loss_page_has_a_density_histogram_per_level():
    figures = density_histograms(ghm_recorders(differ_at=2))
    assert [title.split(",")[0] for title, _ in figures] == list(LEVELS)
    assert all("GHM-C (top)" in title and "GHM-R (bottom)" in title for title, _ in figures)
    assert all(png.startswith(b"\x89PNG") for _, png in figures)
    html = render_stage_html(stage_result("loss", figures=figures))
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert [c.split(",")[0] for c in captions] == list(LEVELS)


def test_the_layer_figure_says_what_it_draws():
    html = render_stage_html(stage_result("forward", layers=layer_rows(5), accumulated_layers=layer_rows(5)))
    assert "accumulated error in the normal run" in re.search(r"<figcaption>([^<]*)", html).group(1)
    html = render_stage_html(stage_result("forward", layers=layer_rows()))
    assert "accumulated" not in re.search(r"<figcaption>([^<]*)", html).group(1)


def test_long_tables_are_folded_unless_they_hold_the_first_divergence():
    result = stage_result("backward", tensors=rows(FOLD_ROWS + 1),
                          extra_tables=[("short", ["a"], [[1]] * FOLD_ROWS), ("long", ["a"], [[1]] * (FOLD_ROWS + 1))])
    html = render_stage_html(result)
    assert html.count("<details>") == 2 and "<details open>" not in html
    assert f"<summary>{FOLD_ROWS + 1} rows</summary>" in html
    failing = stage_result("backward", tensors=rows(FOLD_ROWS + 5, failing=7))
    failing.passed = False
    html = render_stage_html(failing)
    assert f"<details open>\n<summary>{FOLD_ROWS + 5} rows, 1 failing</summary>" in html
    # The banner's link leads into the open table.
    assert html.index('href="#first-divergence"') < html.index("<details open>") < html.index('id="first-divergence"')


def test_tables_sort_in_the_page_itself(tmp_path):
    _, html_path = write_stage_report(stage_result("forward", layers=layer_rows()), tmp_path)
    html = html_path.read_text()
    assert html.count('<table class="sortable">') == 2  # the compared outputs and the layers
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    assert "table.sortable" in script and "<script src" not in html
    assert "http://" not in html and "https://" not in html


# ---------------------------------------------------------------- the stages themselves

@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


@pytest.mark.slow
def test_loss_stage_page_leads_with_a_histogram_per_level(build_dir, tmp_path):
    from align.loss.stage import LossOptions, run_loss

    result = run_loss(LossOptions(shape="2x3x128x128", iters=2, reports=tmp_path, build_dir=build_dir))
    assert result.passed
    assert_figures_lead((tmp_path / "loss.html").read_text(), len(LEVELS))
    titles = json.loads((tmp_path / "loss.json").read_text())["figures"]
    assert [title.split(",")[0] for title in titles] == list(LEVELS)


@pytest.mark.slow
def test_forward_stage_page_leads_with_the_layer_figure(build_dir, tmp_path):
    from align.forward.stage import ForwardOptions, run_forward

    result = run_forward(ForwardOptions(shape="1x3x64x96", reports=tmp_path, build_dir=build_dir,
                                        perturb="backbone.layer3.1.conv2.weight"))
    assert not result.passed
    html = (tmp_path / "forward.html").read_text()
    assert_figures_lead(html, 1)
    assert html.index("<figure>") < html.index('id="first-divergence"')
