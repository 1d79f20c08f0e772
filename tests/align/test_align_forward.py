"""The forward stage end to end on a small input: verdict, files, localization."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.forward.stage import ForwardOptions, first_divergence, run_forward

from tests.paths import ROOT  # noqa: E402

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
SMALL = "1x3x64x96"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")


def options(build_dir, reports, **kw) -> ForwardOptions:
    return ForwardOptions(shape=SMALL, seed=0, reports=reports, build_dir=build_dir, **kw)


def test_forward_stage_passes_and_writes_every_file(build_dir, tmp_path):
    result = run_forward(options(build_dir, tmp_path))
    assert result.passed, [(t.name, t.reason) for t in result.tensors + result.layers if not t.passed][:5]
    names = [t.name for t in result.tensors]
    assert names[:4] == ["backbone.C2", "backbone.C3", "backbone.C4", "backbone.C5"]
    assert "neck.P7" in names and "head.cls_score.P3" in names and "head.bbox_pred.P7" in names
    assert len(names) == 4 + 5 + 10
    # backbone: stem 4 + 16 blocks x 9 calls + 4 shortcuts x 2; neck: 3 + 5;
    # head: 18 calls x 5 levels
    assert len(result.layers) == 4 + 16 * 9 + 8 + 8 + 18 * 5
    for name in ("forward_paddle.npy", "forward_torch.npy", "forward_diff.log",
                 "forward.json", "forward.html", "index.html"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "forward.json").read_text())
    assert report["passed"] is True
    assert report["meta"]["checkpoint_sha256"]
    assert report["meta"]["input_shape"] == [1, 3, 64, 96]


@pytest.mark.parametrize("parameter, layer", [
    ("backbone.layer3.2.conv2.weight", "backbone.layer3.2.conv2"),
    ("backbone.layer1.0.bn1.weight", "backbone.layer1.0.bn1"),
    ("neck.fpn_convs.4.conv.weight", "neck.fpn_convs.4.conv"),
    ("bbox_head.retina_reg.bias", "bbox_head.retina_reg"),
])
def test_perturbed_parameter_is_named_as_first_divergence(build_dir, tmp_path, parameter, layer):
    result = run_forward(options(build_dir, tmp_path, perturb=parameter))
    assert not result.passed
    assert first_divergence(result) == layer
    html = (tmp_path / "forward.html").read_text()
    assert 'id="first-divergence"' in html and layer in html
    assert json.loads((tmp_path / "forward.json").read_text())["passed"] is False


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "align.forward", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_exit_codes(build_dir, tmp_path):
    common = ["--shape", SMALL, "--reports", str(tmp_path), "--no-layers", "--build-dir", str(build_dir)]
    failed = run_cli(*common, "--perturb", "bbox_head.retina_cls.weight")
    assert failed.returncode == 1, failed.stderr
    assert "FAIL" in failed.stdout
    bad_shape = run_cli("--shape", "2x800x1344", "--reports", str(tmp_path))
    assert bad_shape.returncode == 2 and "--shape 2x800x1344" in bad_shape.stderr
    bad_name = run_cli(*common, "--perturb", "backbone.layer9.conv.weight")
    assert bad_name.returncode == 2 and "backbone.layer9.conv.weight" in bad_name.stderr
    missing = run_cli(*common, "--ckpt", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and "nope.pth" in missing.stderr


def test_isolated_forward_names_only_the_perturbed_layer(build_dir, tmp_path):
    target = "backbone.layer3.1.conv2"
    result = run_forward(options(build_dir, tmp_path, isolate=True, perturb=f"{target}.weight"))
    assert not result.passed
    # Each layer's own error: only the perturbed one fails; in the normal run everything after it does.
    assert [r.name for r in result.layers if not r.passed] == [target]
    assert first_divergence(result) == target
    accumulated = next(t.rows for t in result.extra_tables if t.title.startswith("Each layer call's own error"))
    assert sum(1 for row in accumulated if row.accumulated_rel > 1e-5) > 10
    kinds = {row.kind for row in next(t.rows for t in result.extra_tables if t.title.startswith("Worst own"))}
    assert {"conv", "BN", "ReLU", "pool"} <= kinds
    assert result.meta["isolated_layer_calls"] == len(result.layers) and result.meta["peak_memory_gb"] > 0
    assert not any((build_dir / "isolate").iterdir())  # the spilled activations are removed


def test_second_run_takes_mmdet_from_the_cache_and_a_damaged_entry_is_recomputed(tmp_path_factory, capsys):
    build = tmp_path_factory.mktemp("cache_build")
    off = run_forward(options(build, tmp_path_factory.mktemp("r0")))
    assert off.meta["reference_cache"] == "off" and not (build / "cache").exists()
    first = run_forward(options(build, tmp_path_factory.mktemp("r1"), cache=True))
    second = run_forward(options(build, tmp_path_factory.mktemp("r2"), cache=True))
    assert first.meta["reference_cache"] == "miss" and second.meta["reference_cache"] == "hit"
    assert second.meta["torch_forward_s"] == 0.0
    assert [(r.name, r.max_abs) for r in second.tensors + second.layers] == \
        [(r.name, r.max_abs) for r in first.tensors + first.layers]
    (entry,) = (build / "cache").glob("forward-*")
    damaged = sorted(entry.glob("*.npy"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    third = run_forward(options(build, tmp_path_factory.mktemp("r3"), cache=True))
    assert third.meta["reference_cache"] == "mismatch" and third.passed
    fresh = run_forward(options(build, tmp_path_factory.mktemp("r4"), cache=True, fresh=True))
    assert fresh.meta["reference_cache"] == "fresh"
    # A manifest that is JSON but not an object: a mismatch named on stderr, then recomputed.
    (entry,) = (build / "cache").glob("forward-*")
    (entry / "manifest.json").write_text("[1, 2, 3]")
    capsys.readouterr()
    planted = run_forward(options(build, tmp_path_factory.mktemp("r5"), cache=True))
    assert planted.meta["reference_cache"] == "mismatch" and planted.passed
    assert capsys.readouterr().err.splitlines() == [
        f"cache: {entry}: manifest.json holds a list, not an object; recomputing"]
    again = run_forward(options(build, tmp_path_factory.mktemp("r6"), cache=True))
    assert again.meta["reference_cache"] == "hit"
