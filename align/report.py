"""Stage reports: one JSON and one self-contained HTML page per alignment stage, plus an index.

A stage (forward, loss, backward, ...) hands a `StageResult` to
`write_stage_report`. The HTML page needs nothing but itself to be read:
CSS is inline, figures are base64 data URIs, and no URL is referenced.
Every string coming from models or users is escaped by jinja2's autoescape.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import json
import math
import numbers
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jinja2

from .compare import TensorDiff, first_failure, json_float

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Stages in the order `make align` runs them (each builds on the ones before); others follow alphabetically.
STAGE_ORDER = ("forward", "loss", "backward", "data", "predict", "metric", "train_align")

# Threshold names under which a stage may pass its relative tolerance (drawn on the layer figure).
REL_THRESHOLD_KEYS = ("rel_tol", "rel_max")

# Distribution names to look up per reported package (Paddle ships under two names).
_PACKAGES = {
    "torch": ("torch",),
    "paddle": ("paddlepaddle", "paddlepaddle-gpu"),
    "mmdet": ("mmdet",),
    "mmcv": ("mmcv", "mmcv-full", "mmcv-lite"),
    "mmengine": ("mmengine",),
    "numpy": ("numpy",),
    "reprod_log": ("reprod_log", "reprod-log"),
}


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
        thresholds: tolerances used, for display (name -> value); a
            ``"rel_tol"`` or ``"rel_max"`` entry is drawn on the layer figure.
        meta: provenance (seed, input shape, checkpoint path and sha256, ...).
        env: see `environment_info`.
        extra_tables: ``(title, columns, rows)``, each row a sequence of cells.
        figures: ``(title, png_bytes)``.
        reprod_log: key -> mean absolute difference computed by reprod_log.
        reprod_log_threshold: when set, reprod_log rows above it (or not
            finite) are shown failing.
    """

    stage: str
    title: str
    passed: bool
    tensors: list[TensorDiff]
    layers: list[TensorDiff] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    extra_tables: list[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    reprod_log: dict[str, float] = field(default_factory=dict)
    reprod_log_threshold: float | None = None


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _package_version(module: str, distributions: Sequence[str]) -> str:
    # An already imported module is what actually ran: prefer its own version.
    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__
    from importlib import metadata

    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Interpreter, machine, package versions, git commit of this checkout, and a UTC timestamp."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for module, dists in _PACKAGES.items():
        info[module] = _package_version(module, dists)
    commit = _git("rev-parse", "HEAD")
    info["git_commit"] = commit or "unavailable"
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(status) if status is not None else "unknown"
    info["timestamp_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return info


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates the file private (0600); reports are for everyone.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def layer_profile_png(rows: Sequence[TensorDiff], rel_tol: float | None) -> bytes:
    """PNG of each row's relative max difference along execution order (log scale).

    Non-finite rows are drawn as red triangles at the top edge; failing
    rows are red, passing rows blue.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    finite = [(i, r.rel_max) for i, r in enumerate(rows) if math.isfinite(r.rel_max)]
    floor = 1e-12
    values = [max(v, floor) for _, v in finite]
    top = max(values + [rel_tol or floor, floor]) * 10
    axes.plot([i for i, _ in finite], values, color="#9aa5b1", linewidth=0.8)
    for colour, keep in (("#1f6fb2", True), ("#c0392b", False)):
        points = [(i, max(v, floor)) for i, v in finite if rows[i].passed == keep]
        axes.scatter([p[0] for p in points], [p[1] for p in points], s=10, color=colour, zorder=3)
    bad = [i for i, r in enumerate(rows) if not math.isfinite(r.rel_max)]
    axes.scatter(bad, [top] * len(bad), marker="^", s=30, color="#c0392b", zorder=4)
    if rel_tol:
        axes.axhline(rel_tol, color="#c0392b", linestyle="--", linewidth=0.8)
    axes.set_yscale("log")
    bottom = min(values + [top]) / 10
    axes.set_ylim(max(bottom, floor / 2), top * 2)
    axes.set_xlabel("layer output, execution order")
    axes.set_ylabel("max|diff| / max|ref|")
    figure.tight_layout()
    buffer = io.BytesIO()
    # No "Software" chunk: it would carry matplotlib's URL into the page.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


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
        profile = layer_profile_png(result.layers, _rel_threshold(result.thresholds))
        caption = (
            "Relative max difference of each layer output, in execution order "
            "(blue pass, red fail, dashed line the tolerance, triangles at the top NaN/Inf)"
        )
        figures.insert(0, (caption, profile))
    template = _environment().get_template("stage.html.j2")
    return template.render(
        result=result,
        passed=_verdict(result),
        first_name=name,
        first_layer_index=layer_index,
        first_tensor_index=tensor_index,
        reprod_rows=_reprod_rows(result),
        figures=[(title, _data_uri(png)) for title, png in figures],
    )


def write_stage_report(result: StageResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``{stage}.json`` and ``{stage}.html`` in ``out_dir`` (atomically), then refresh the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{result.stage}.json"
    html_path = out / f"{result.stage}.html"
    document = json.dumps(stage_json(result), indent=2, allow_nan=False)
    html = render_stage_html(result)
    _atomic_write(html_path, html.encode("utf-8"))
    _atomic_write(json_path, document.encode("utf-8"))
    write_index(out)
    return json_path, html_path


def _stage_sort_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def write_index(out_dir: str | os.PathLike) -> Path:
    """Write ``index.html`` linking every ``{stage}.html`` that has a stage ``{stage}.json`` beside it."""
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
        stages.append(
            {
                "stage": document["stage"],
                "title": document.get("title", document["stage"]),
                "passed": document["passed"] is True,
                "first_divergence": document.get("first_divergence"),
                "href": html_path.name,
            }
        )
    stages.sort(key=lambda s: _stage_sort_key(s["stage"]))
    html = _environment().get_template("index.html.j2").render(
        stages=stages,
        passed=bool(stages) and all(s["passed"] for s in stages),
        generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    index_path = out / "index.html"
    _atomic_write(index_path, html.encode("utf-8"))
    return index_path
