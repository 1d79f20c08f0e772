"""Stage reports: one JSON and one self-contained HTML page per alignment stage, plus an index.

A stage (forward, loss, backward, ...) hands a `StageResult` to
`write_stage_report`. The HTML page needs nothing but itself to be read:
CSS is inline, figures are base64 data URIs, and no URL is referenced.
Every string coming from models or users is escaped by jinja2's autoescape.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import io
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jinja2

from common.atomic_write import write_text
from .compare import TensorDiff, first_failure, json_float, worst_row

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# Threshold names under which a stage may pass its relative tolerance (drawn on the layer figure).
REL_THRESHOLD_KEYS = ("rel_tol", "rel_max")
# Tables longer than this are folded (a click opens them) unless they hold the first divergence,
# so the figures and the short tables stay on the first screen.
FOLD_ROWS = 20


class Table(NamedTuple):
    """A table of a stage report; each row a sequence of cells (a NamedTuple reads best)."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Headline:
    """The one figure the index shows for a stage: the worst difference beside its bound.

    Attributes:
        label: what the figure is, e.g. ``"worst output, max|diff| / max|ref|"``.
        value: the figure.
        bound: the bound it is checked against (None: informational).
        where: the row it comes from.
    """

    label: str
    value: float
    bound: float | None = None
    where: str = ""

    @classmethod
    def worst(cls, rows: Sequence[TensorDiff], bound: float | None,
              label: str = "worst max|diff| / max|ref|") -> "Headline | None":
        """The row of ``rows`` with the largest relative difference (NaN first); None for no rows."""
        row = worst_row(rows)
        return None if row is None else cls(label, row.rel_max, bound, row.name)

    @classmethod
    def largest_abs(cls, rows: Sequence[TensorDiff], bound: float | None,
                    label: str = "largest max|diff|") -> "Headline | None":
        """The row of ``rows`` with the largest absolute difference (NaN first); None for no rows."""
        row = max(rows, key=lambda r: math.inf if math.isnan(r.max_abs) else r.max_abs, default=None)
        return None if row is None else cls(label, row.max_abs, bound, row.name)


@dataclass
class StageResult:
    """Everything one alignment stage reports.

    Attributes:
        stage: file stem and identifier, e.g. "forward".
        title: human-readable heading.
        passed: the stage's own verdict. The written verdict is also FAIL
            whenever a row of ``tensors`` or ``layers`` failed, or a
            reprod_log figure is not finite or above its threshold.
        tensors: the compared outputs.
        layers: optional layer-by-layer rows, in execution order.
        accumulated_layers: when ``layers`` are each layer's own error (measured
            on the reference's input to that layer), the same layers' error in the
            normal run, matched by name: drawn behind them on the layer figure, so
            a reviewer sees what each layer adds and what it inherits.
        thresholds: tolerances used, for display (name -> value); a
            ``"rel_tol"`` or ``"rel_max"`` entry is drawn on the layer figure.
        meta: provenance (seed, input shape, checkpoint path and sha256, ...).
        env: see `environment_info`.
        extra_tables: `Table` s (plain ``(title, columns, rows)`` tuples are converted).
        figures: ``(title, png_bytes)``.
        reprod_log: key -> mean absolute difference computed by reprod_log.
        reprod_log_threshold: when set, reprod_log rows above it (or not
            finite) are shown failing.
        reprod_log_check: the ``diff_threshold`` of reprod_log's own check
            (its "diff check passed/failed" line in ``<stage>_diff.log``).
        reprod_log_why: why the stage's verdict may differ from that check
            (the bound the verdict uses instead), said in the report when it does.
        headline: the stage's figure for the index.
        seconds: time each side took, by side name.
        side_run: summary of an informational run beside the checked one
            (e.g. at float32 when the verdict is taken in float64).
    """

    stage: str
    title: str
    passed: bool
    tensors: list[TensorDiff]
    layers: list[TensorDiff] = field(default_factory=list)
    accumulated_layers: list[TensorDiff] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    extra_tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    reprod_log: dict[str, float] = field(default_factory=dict)
    reprod_log_threshold: float | None = None
    reprod_log_check: float | None = None
    reprod_log_why: str = ""
    headline: Headline | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    side_run: str = ""

    def __post_init__(self) -> None:
        self.extra_tables = [Table(*table) for table in self.extra_tables]


def format_number(value: Any) -> str:
    """Real numbers in scientific notation (non-finite as nan/inf); integers and the rest as text."""
    if value is None:
        return ""
    if isinstance(value, (bool, numbers.Integral)) or not isinstance(value, numbers.Real):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(json_float(value))
    return f"{value:.3e}"


def _format_shape(shape) -> str:
    return "-" if shape is None else str(tuple(int(d) for d in shape))


def _display_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return format_number(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = format_number
    env.filters["shape"] = _format_shape
    env.filters["value"] = _display_value
    return env


def layer_profile_png(rows: Sequence[TensorDiff], rel_tol: float | None,
                      accumulated: Sequence[TensorDiff] = (), xlabel: str = "layer output, execution order") -> bytes:
    """PNG of each row's relative max difference along execution order (log scale).

    Passing rows are blue, failing rows red, non-finite ones red triangles at
    the top; exact agreement (no logarithm) is drawn as grey ticks a decade
    below the smallest nonzero value. The bound is dashed, the first failing
    row marked by a dotted line and its name. ``accumulated`` (see
    `StageResult.accumulated_layers`) is a grey line behind ``rows``. Where the
    names have several top-level parts (backbone, neck, ...), thin lines part them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    by_name = {row.name: row.rel_max for row in accumulated}
    behind = [(i, by_name[row.name]) for i, row in enumerate(rows) if row.name in by_name]
    nonzero = [v for v in [r.rel_max for r in rows] + [v for _, v in behind] if math.isfinite(v) and v > 0]
    floor = min(nonzero, default=rel_tol or 1e-12) / 10
    top = max(nonzero + [rel_tol or floor]) * 10

    def shown(value: float) -> float:
        return max(value, floor) if math.isfinite(value) else top

    line = behind or [(i, r.rel_max) for i, r in enumerate(rows)]
    axes.plot([i for i, _ in line], [shown(v) for _, v in line], color="#9aa5b1",
              linewidth=1.0 if behind else 0.8, label="accumulated (normal run)" if behind else None)
    own = "own, " if behind else ""
    kinds = (("within the bound", dict(s=10, color="#1f6fb2"), lambda r: r.passed and r.rel_max > 0),
             ("exactly equal", dict(s=30, marker="|", color="#57606a"), lambda r: r.passed and r.rel_max == 0),
             ("over the bound", dict(s=10, color="#c0392b"), lambda r: not r.passed and math.isfinite(r.rel_max)),
             ("NaN / Inf", dict(s=30, marker="^", color="#c0392b"), lambda r: not math.isfinite(r.rel_max)))
    for label, style, member in kinds:
        points = [i for i, r in enumerate(rows) if member(r)]
        if points:
            axes.scatter(points, [shown(rows[i].rel_max) for i in points], zorder=3, label=own + label, **style)
    if rel_tol:
        axes.axhline(rel_tol, color="#c0392b", linestyle="--", linewidth=0.8, label=f"bound {rel_tol:.0e}")
    _mark_parts(axes, [r.name for r in rows])
    first = first_failure(rows)
    if first is not None:
        axes.axvline(first, color="#c0392b", linestyle=":", linewidth=1.2, label=f"first over: {rows[first].name}")
    axes.set_yscale("log")
    axes.set_ylim(floor / 3, top * 5)
    axes.set_xlim(-1, max(len(rows), 1))
    axes.set_xlabel(xlabel)
    axes.set_ylabel("max|diff| / max|ref|")
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=4, fontsize=8, frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    # No "Software" chunk: it would carry matplotlib's URL into the page.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _mark_parts(axes, names: Sequence[str]) -> None:
    """Thin lines and labels at the top where the first part of the names changes (at most 12 parts)."""
    starts = [i for i, name in enumerate(names) if i == 0 or name.split(".")[0] != names[i - 1].split(".")[0]]
    if not 2 <= len(starts) <= 12:
        return
    for k, i in enumerate(starts):
        if i:
            axes.axvline(i - 0.5, color="#d0d7de", linewidth=0.8)
        # Two heights, in turn: a short part's label would run into the next one's.
        axes.annotate(names[i].split(".")[0], (i, 0.98 - 0.08 * (k % 2)), xycoords=("data", "axes fraction"),
                      xytext=(3, 0), textcoords="offset points", va="top", fontsize=8, color="#57606a")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _first_divergence(result: StageResult) -> tuple[str | None, int | None, int | None]:
    """``(name, layer_index, tensor_index)`` of the first failing layer row, else first failing tensor."""
    index = first_failure(result.layers)
    if index is not None:
        return result.layers[index].name, index, None
    index = first_failure(result.tensors)
    if index is not None:
        return result.tensors[index].name, None, index
    return None, None, None


def _verdict(result: StageResult) -> bool:
    """The stage's own verdict, overruled by any failing row or reprod_log figure."""
    rows_ok = first_failure(result.tensors) is None and first_failure(result.layers) is None
    reprod_ok = all(row["passed"] for row in _reprod_rows(result))
    return bool(result.passed) and rows_ok and reprod_ok


def _reprod_rows(result: StageResult) -> list[dict[str, Any]]:
    rows = []
    for name, mean in result.reprod_log.items():
        mean = float(mean)
        ok = math.isfinite(mean)
        if ok and result.reprod_log_threshold is not None:
            ok = mean <= result.reprod_log_threshold
        rows.append({"name": name, "mean": mean, "passed": ok})
    return rows


def reprod_log_disagreement(result: StageResult) -> str | None:
    """A sentence when reprod_log's own mean check and the stage's verdict disagree, else None."""
    check = result.reprod_log_check
    if check is None or not result.reprod_log:
        return None
    failing = {k: float(v) for k, v in result.reprod_log.items() if not (math.isfinite(float(v)) and v <= check)}
    passed = _verdict(result)
    if passed and failing:
        name = max(failing, key=lambda k: math.inf if not math.isfinite(failing[k]) else failing[k])
        why = result.reprod_log_why or ("the verdict bounds each compared row as the thresholds above say, "
                                        "not by one absolute mean")
        return (f"reprod_log's own check (mean |diff| <= {check:.0e}) says \"diff check failed\" for "
                f"{len(failing)} of {len(result.reprod_log)} entries (largest: {name}, mean {failing[name]:.2e}), "
                f"yet the stage passes: {why}.")
    if not passed and not failing:
        first, _, _ = _first_divergence(result)
        return (f"reprod_log's own check (mean |diff| <= {check:.0e}) passes every entry, yet the stage fails"
                f"{f' at {first}' if first else ''}: a mean over a tensor hides a difference its maximum shows, "
                f"and the verdict bounds the maximum.")
    return None


def _jsonable(value: Any) -> Any:
    """``value`` made strict-JSON: numpy values to Python, non-finite floats to strings, others to str."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return json_float(float(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def stage_json(result: StageResult) -> dict[str, Any]:
    """The JSON document of a stage (strict JSON: non-finite numbers as strings)."""
    name, layer_index, _ = _first_divergence(result)
    return {
        "stage": result.stage,
        "title": result.title,
        "passed": _verdict(result),
        "first_divergence": name,
        "first_diverging_layer": None if layer_index is None else name,
        "thresholds": _jsonable(result.thresholds),
        "tensors": [row.to_dict() for row in result.tensors],
        "layers": [row.to_dict() for row in result.layers],
        "reprod_log": {k: json_float(v) for k, v in result.reprod_log.items()},
        "reprod_log_threshold": result.reprod_log_threshold,
        "reprod_log_check": result.reprod_log_check,
        "reprod_log_disagreement": reprod_log_disagreement(result),
        "headline": None if result.headline is None else _jsonable(dataclasses.asdict(result.headline)),
        "seconds": _jsonable(result.seconds),
        "side_run": result.side_run,
        "extra_tables": [
            {"title": title, "columns": list(columns), "rows": _jsonable(rows)}
            for title, columns, rows in result.extra_tables
        ],
        "figures": [title for title, _ in result.figures],
        "meta": _jsonable(result.meta),
        "env": _jsonable(result.env),
    }


def _rel_threshold(thresholds: dict[str, Any]) -> float | None:
    for key in REL_THRESHOLD_KEYS:
        value = thresholds.get(key)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    return None


def render_stage_html(result: StageResult) -> str:
    """The self-contained HTML page of a stage."""
    name, layer_index, tensor_index = _first_divergence(result)
    figures = list(result.figures)
    if result.layers:
        profile = layer_profile_png(result.layers, _rel_threshold(result.thresholds), result.accumulated_layers)
        what = ("Own error of each layer call, measured on the reference's input to it (blue within the bound, "
                "red over it), and its accumulated error in the normal run (grey)" if result.accumulated_layers
                else "Relative max difference of each layer output (blue within the bound, red over it)")
        caption = (f"{what}, in execution order; dashed: the bound; dotted: the first layer over it; "
                   "triangles at the top: NaN/Inf")
        figures.insert(0, (caption, profile))
    template = _environment().get_template("stage.html.j2")
    return template.render(
        result=result,
        passed=_verdict(result),
        first_name=name,
        first_layer_index=layer_index,
        first_tensor_index=tensor_index,
        reprod_rows=_reprod_rows(result),
        reprod_disagreement=reprod_log_disagreement(result),
        figures=[(title, _data_uri(png)) for title, png in figures],
        fold_rows=FOLD_ROWS,
    )


def write_stage_report(result: StageResult, out_dir: str | os.PathLike,
                       order: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``{stage}.json`` and ``{stage}.html`` in ``out_dir`` (atomically), then refresh the index.

    ``order``: the stage names in the order the index lists them (see `write_index`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{result.stage}.json"
    html_path = out / f"{result.stage}.html"
    document = json.dumps(stage_json(result), indent=2, allow_nan=False)
    html = render_stage_html(result)
    write_text(html_path, html)
    write_text(json_path, document)
    write_index(out, order)
    return json_path, html_path


def write_index(out_dir: str | os.PathLike, order: Sequence[str] = ()) -> Path:
    """Write ``index.html`` linking every ``{stage}.html`` that has a stage ``{stage}.json`` beside it.

    Stages named in ``order`` come first, in that order (a client lists its
    stages in the order they build on each other); the others follow alphabetically.
    """
    order = list(order)
    out = Path(out_dir)
    stages = []
    for json_path in out.glob("*.json"):
        html_path = json_path.with_suffix(".html")
        if not html_path.exists():
            continue
        try:
            document = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(document, dict) or "stage" not in document or "passed" not in document:
            continue
        headline = document.get("headline") if isinstance(document.get("headline"), dict) else None
        seconds = document.get("seconds") if isinstance(document.get("seconds"), dict) else {}
        stages.append(
            {
                "stage": document["stage"],
                "title": document.get("title", document["stage"]),
                "passed": document["passed"] is True,
                "first_divergence": document.get("first_divergence"),
                "href": html_path.name,
                "headline": headline,
                "seconds": seconds,
                "side_run": document.get("side_run") or "",
            }
        )
    stages.sort(key=lambda s: (order.index(s["stage"]) if s["stage"] in order else len(order), s["stage"]))
    html = _environment().get_template("index.html.j2").render(
        stages=stages,
        passed=bool(stages) and all(s["passed"] for s in stages),
        generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    index_path = out / "index.html"
    write_text(index_path, html)
    return index_path
