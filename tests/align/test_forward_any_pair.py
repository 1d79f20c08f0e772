"""`python -m align.forward` aligns any pair two builders make, through the same stage as the GHM
model: layers, outputs, reprod_log files, the reference cache, isolation, the report."""
from __future__ import annotations

import json

from align.forward.__main__ import main as forward_main

PAIR = ["--torch", "tests.align.pair_builders:block_torch", "--paddle", "tests.align.pair_builders:block_paddle",
        "--shape", "2x3x16x16"]


def run(tmp_path, *extra) -> tuple[int, dict]:
    status = forward_main(PAIR + ["--reports", str(tmp_path / "reports"), "--build-dir", str(tmp_path / "build"),
                                  *extra])
    report = tmp_path / "reports" / "pair.json"
    return status, json.loads(report.read_text()) if report.is_file() else {}


def test_a_pair_runs_through_the_forward_stage_with_reprod_log_and_the_cache(tmp_path):
    status, first = run(tmp_path, "--cache")
    assert status == 0 and first["passed"] and first["meta"]["reference_cache"] == "miss"
    assert [t["name"] for t in first["tensors"]] == ["output"]
    assert [r["name"] for r in first["layers"]][:3] == ["conv1", "bn1", "relu"]
    for name in ("pair_paddle.npy", "pair_torch.npy", "pair_diff.log", "pair.html"):
        assert (tmp_path / "reports" / name).is_file()
    status, second = run(tmp_path, "--cache")
    assert status == 0 and second["meta"]["reference_cache"] == "hit"
    assert [(r["name"], r["max_abs"]) for r in second["layers"]] == [(r["name"], r["max_abs"]) for r in first["layers"]]
    # A fault of the Paddle side is still caught against the cached reference, at its layer.
    status, perturbed = run(tmp_path, "--cache", "--perturb", "conv2.weight")
    assert status == 1 and perturbed["meta"]["reference_cache"] == "hit"
    assert perturbed["first_divergence"] == "conv2"


def test_a_pair_in_isolation_with_gradients_names_only_the_perturbed_layer(tmp_path):
    status, report = run(tmp_path, "--isolate", "--backward", "--perturb", "conv2.weight")
    assert status == 1
    assert {r["name"].split(".")[0].split("#")[0] for r in report["layers"] if not r["passed"]} == {"conv2"}


def test_the_pair_options_are_checked(tmp_path, capsys):
    assert forward_main(["--torch", "tests.align.pair_builders:block_torch",
                         "--reports", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --torch and --paddle come together: each names the builder of one side"]
    assert forward_main(PAIR + ["--ckpt", "model.pth", "--reports", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error: --ckpt model.pth:")
    assert forward_main(["--map", "names.json", "--reports", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --map is for a pair of --torch and --paddle builders"]
    assert not (tmp_path / "r").exists()


def test_without_carrying_linear_weight_gradients_are_compared_in_paddles_layout(tmp_path):
    argv = list(PAIR)
    argv[3] = "tests.align.pair_builders:block_paddle_carried"
    status = forward_main(argv + ["--no-carry", "--backward", "--reports", str(tmp_path / "nc")])
    rows = {t["name"]: t for t in json.loads((tmp_path / "nc" / "pair.json").read_text())["tensors"]}
    assert status == 0 and rows["grad.fc.weight"]["passed"] and rows["grad.fc.weight"]["test_shape"] == [8, 5]
