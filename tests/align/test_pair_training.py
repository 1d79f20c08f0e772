"""`python -m align.backward --torch ... --paddle ...`: any pair trained in lockstep with each framework's own
optimizer, every step compared, through the same stage as the GHM RetinaNet."""
from __future__ import annotations

import dataclasses
import json

import pytest

from align.backward.__main__ import main as backward_main
from align.pair import optimizers, training

BLOCK = ["--torch", "tests.align.pair_builders:block_torch", "--paddle", "tests.align.pair_builders:block_paddle",
         "--shape", "2x3x16x16", "--steps", "3"]
STATE = {"sgd": [], "momentum": ["momentum"], "adam": ["moment1", "moment2"], "adamw": ["moment1", "moment2"]}


def run(tmp_path, argv) -> tuple[int, dict]:
    status = backward_main(argv + ["--reports", str(tmp_path)])
    report = tmp_path / "pair_backward.json"
    return status, json.loads(report.read_text()) if report.is_file() else {}


def failed(report) -> list[str]:
    return [t["name"] for t in report["tensors"] if not t["passed"]]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_each_optimizer_agrees_in_float64(tmp_path, optimizer):
    status, report = run(tmp_path, BLOCK + ["--optimizer", optimizer, "--extra-dtype", "none", "--clip-norm", "2",
                                            "--weight-decay", "0.01"])
    assert status == 0, failed(report)[:3]
    names = [t["name"] for t in report["tensors"]]
    assert names[0] == "step1.loss" and "grad.conv1.weight" in names and "step3.grad_norm" in names
    assert "param.fc.weight" in names
    groups = {name.split(".")[0] for name in names} - {"step1", "step2", "step3", "grad", "param"}
    assert groups == set(STATE[optimizer])
    assert all(f"{group}.bn2.bias" in names for group in STATE[optimizer])
    # The clipping acted on both sides (the block's gradient norm is about 2.7).
    steps = next(t for t in report["extra_tables"] if t["title"].startswith("Per step, float64"))
    assert all(row[steps["columns"].index("clipped")] for row in steps["rows"])
    worst = max(t["rel_max"] for t in report["tensors"])
    assert worst < 1e-11
    assert report["meta"]["optimizer"] == optimizer and report["thresholds"]["later losses, grad norms (rel)"] == 1e-9


def test_float32_is_reported_beside_and_does_not_decide(tmp_path):
    status, report = run(tmp_path, BLOCK + ["--optimizer", "adam", "--train-steps", "2"])
    assert status == 0 and report["meta"]["steps"] == 2
    assert set(report["meta"]["runs"]) == {"float64", "float32"} and report["side_run"].startswith("float32")
    assert any(t["title"] == "Per step, float32 (informational)" for t in report["extra_tables"])
    assert (tmp_path / "pair_backward_diff.log").is_file() and (tmp_path / "pair_backward.html").is_file()
    assert (tmp_path / "pair_backward_paddle.npy").is_file() and (tmp_path / "pair_backward_torch.npy").is_file()


def test_a_float32_run_is_checked_when_asked(tmp_path):
    status, report = run(tmp_path, BLOCK + ["--dtype", "float32"])
    assert status == 0, failed(report)[:3]
    assert report["meta"]["dtype"] == "float32" and report["thresholds"]["step-1 gradients (rel)"] == 1e-5


def test_a_user_loss_factory_is_trained(tmp_path):
    status, report = run(tmp_path, BLOCK + ["--loss", "tests.align.pair_builders:squared_loss", "--extra-dtype",
                                            "none"])
    assert status == 0, failed(report)[:3]
    assert report["meta"]["loss"] == "tests.align.pair_builders:squared_loss"


def test_a_wrong_backward_fails_at_the_first_gradients(tmp_path):
    argv = list(BLOCK)
    argv[3] = "tests.align.pair_builders:block_paddle_wrong_backward"
    status, report = run(tmp_path, argv)
    assert status == 1
    assert failed(report)[0].startswith("grad.")


def test_a_wrong_optimizer_mapping_is_caught(tmp_path, monkeypatch):
    # Paddle's AdamW (decoupled decay) where torch runs Adam (coupled L2).
    real = optimizers.paddle_optimizer
    monkeypatch.setattr(training, "paddle_optimizer",
                        lambda params, s, clip: real(params, dataclasses.replace(s, kind="adamw"), clip))
    status, report = run(tmp_path, BLOCK + ["--optimizer", "adam", "--weight-decay", "0.01"])
    assert status == 1
    assert any(name.startswith(("param.", "moment1.")) for name in failed(report))
    assert not [name for name in failed(report) if name.startswith(("grad.", "step1."))]


def test_clipping_as_paddle_does_it_is_caught(tmp_path, monkeypatch):
    # Paddle's own bound (no 1e-6 added to the norm): the momentum differs by about 4e-7.
    monkeypatch.setattr(optimizers.PaddleClip, "set_norm", lambda self, norm: None)
    status, report = run(tmp_path, BLOCK + ["--clip-norm", "1"])
    assert status == 1 and any(name.startswith("momentum.") for name in failed(report))


def test_a_missing_weight_decay_on_the_paddle_side_is_caught_in_float64(tmp_path, monkeypatch):
    real = training.PaddleTraining.__init__

    def without_decay(self, model, settings, loss):
        real(self, model, dataclasses.replace(settings, weight_decay=0.0), loss)

    monkeypatch.setattr(training.PaddleTraining, "__init__", without_decay)
    status, report = run(tmp_path, BLOCK)
    assert status == 1
    assert any(name.startswith(("param.", "momentum.")) for name in failed(report))


def test_a_perturbed_parameter_is_named(tmp_path, monkeypatch):
    real = training.PaddleTraining.__init__

    def perturbed(self, model, settings, loss):
        weight = dict(model.named_parameters())["conv1.weight"]
        weight.set_value(weight * (1 + 1e-6))
        real(self, model, settings, loss)

    monkeypatch.setattr(training.PaddleTraining, "__init__", perturbed)
    status, report = run(tmp_path, BLOCK + ["--extra-dtype", "none"])
    assert status == 1 and failed(report)[0] == "step1.loss"
    ranked = next(t for t in report["extra_tables"] if t["title"].startswith("Parameters ranked"))
    assert ranked["rows"][0][0] == "conv1.weight"


@pytest.mark.parametrize("argv, line", [
    (["--optimizer", "rmsprop"], "error: --optimizer 'rmsprop': one of sgd, momentum, adam, adamw"),
    (["--loss", "nowhere.module:factory"], "error: --loss 'nowhere.module:factory': cannot import nowhere.module"),
    (["--loss", "tests.align.pair_builders:no_such_factory"], "error: --loss "
                                                              "'tests.align.pair_builders:no_such_factory': "),
    (["--loss", "tests.align.pair_builders:not_callable_loss"], "error: --loss "
                                                                "tests.align.pair_builders:not_callable_loss: "),
])
def test_a_bad_optimizer_or_loss_is_one_line_before_any_work(tmp_path, capsys, argv, line):
    status = backward_main(BLOCK + argv + ["--reports", str(tmp_path / "r"), "--build-dir", str(tmp_path / "b")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not any(tmp_path.iterdir())


def test_the_pair_options_are_checked(tmp_path, capsys):
    assert backward_main(["--torch", "tests.align.pair_builders:block_torch", "--reports", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --torch and --paddle come together: each names the builder of one side"]
    for flag, value in (("--map", "names.json"), ("--optimizer", "adam"), ("--loss", "m:f"),
                        ("--weight-decay", "0.1")):
        assert backward_main([flag, value, "--reports", str(tmp_path)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {flag} is for a pair of --torch and --paddle builders"]
    assert backward_main(BLOCK + ["--isolate", "--reports", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --isolate is for the GHM RetinaNet, not a pair of --torch and --paddle builders"]
    assert not any(tmp_path.iterdir())


def test_the_torch_side_is_replayed_from_the_cache_and_a_fault_is_still_caught(tmp_path, monkeypatch):
    cached = BLOCK + ["--cache", "--build-dir", str(tmp_path / "build")]
    status, first = run(tmp_path / "r1", cached)
    assert status == 0 and first["meta"]["reference_cache"] == "miss"
    status, second = run(tmp_path / "r2", cached)
    assert status == 0 and second["meta"]["reference_cache"] == "hit"
    assert second["meta"]["runs"]["float32"]["reference_cache"] == "hit"
    assert [(t["name"], t["max_abs"]) for t in second["tensors"]] == [(t["name"], t["max_abs"]) for t in first["tensors"]]
    # The ReLU census reads the recorded masks.
    assert second["meta"]["runs"]["float32"]["relu_mask_flips_step1"] == first["meta"]["runs"]["float32"][
        "relu_mask_flips_step1"]

    real = training.PaddleTraining.__init__
    monkeypatch.setattr(training.PaddleTraining, "__init__", lambda self, model, settings, loss: real(
        self, model, dataclasses.replace(settings, weight_decay=0.0), loss))
    status, faulty = run(tmp_path / "r3", cached)
    assert status == 1 and faulty["meta"]["reference_cache"] == "hit"


def test_the_relu_census_goes_through_the_name_map(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"prefixes": [["body.", ""]]}))
    argv = BLOCK + ["--map", str(names), "--steps", "1", "--extra-dtype", "none"]
    argv[1] = "tests.align.pair_builders:block_torch_wrapped"
    status, report = run(tmp_path / "r", argv)
    assert status == 0, failed(report)[:3]
    census = next(t for t in report["extra_tables"] if t["title"].startswith("ReLU mask disagreements"))
    # Both calls of the block's one ReLU, 2 x 8 x 16 x 16 elements each, paired by their mapped name.
    assert census["rows"][-1][0] == "all ReLU layers" and census["rows"][-1][-1] == 2 * 2 * 8 * 16 * 16


EXAMPLES = {
    "transformer": ["--shape", "2x6x64"],
    "lstm": ["--shape", "2x5x16"],
    "text_classifier": ["--input", "ids:int64:2x8:0..1000", "--input", "mask:bool:2x8"],
}


def example(name: str) -> list[str]:
    """The example pair ``align.examples.<name>`` with its map, inputs and 3 AdamW steps in float64."""
    return ["--torch", f"align.examples.{name}:build_torch", "--paddle", f"align.examples.{name}:build_paddle",
            "--map", f"align/examples/{name}_map.json", *EXAMPLES[name], "--train-steps", "3", "--optimizer",
            "adamw", "--dtype", "float64", "--extra-dtype", "none"]


@pytest.mark.parametrize("name, converted", [
    # A packed in_proj_weight's gradient and moments split into q, k, v (transposed) as the weight was.
    ("transformer", "moment1.self_attn.k_proj.weight"),
    # The LSTM's gate tensors under Paddle's names, trained in Paddle's training mode.
    ("lstm", "moment2.lstm.weight_hh_l1_reverse"),
    # Token ids and a mask as keyword arguments; the embedding's weight is trained, the ids take no gradient.
    ("text_classifier", "grad.encoder.layers.1.self_attn.v_proj.weight"),
])
def test_an_example_pair_trains_in_lockstep_through_its_conversions(tmp_path, name, converted):
    status, report = run(tmp_path, example(name))
    assert status == 0, failed(report)[:3]
    names = {t["name"] for t in report["tensors"]}
    assert converted in names
    assert not any(n.endswith(("in_proj_weight", "in_proj_bias")) for n in names)
    worst = {row[1]: row[3] for row in report["extra_tables"][0]["rows"]}
    assert max(worst.values()) < 1e-9 and report["meta"]["optimizer"] == "adamw"


def test_keyword_inputs_are_drawn_again_each_step_and_passed_positionally_when_asked(tmp_path):
    status, report = run(tmp_path, example("text_classifier") + ["--positional", "--train-steps", "2"])
    assert status == 0, failed(report)[:3]
    assert report["meta"]["input_shape"] == {"ids": "int64[2, 8]", "mask": "bool[2, 8]"}
    assert report["meta"]["positional"] is True
    losses = [t for t in report["tensors"] if t["name"].endswith(".loss")]
    assert len(losses) == 2


def test_a_perturbed_gate_tensor_fails_the_training_comparison_and_is_ranked_first(tmp_path, monkeypatch):
    real = training.PaddleTraining.__init__

    def perturbed(self, model, settings, loss):
        weight = dict(model.named_parameters())["lstm.weight_hh_l1_reverse"]
        weight.set_value(weight * (1 + 1e-6))
        real(self, model, settings, loss)

    monkeypatch.setattr(training.PaddleTraining, "__init__", perturbed)
    status, report = run(tmp_path, example("lstm"))
    assert status == 1 and failed(report)[0] == "step1.loss"
    assert "param.lstm.weight_hh_l1_reverse" in failed(report)
    ranked = next(t for t in report["extra_tables"] if t["title"].startswith("Parameters ranked"))
    assert ranked["rows"][0][0] == "lstm.weight_hh_l1_reverse"


def test_a_wrong_gate_order_fails_the_training_comparison(tmp_path, monkeypatch):
    from align.engine import converters

    monkeypatch.setitem(converters.GATES, "LSTM", ("ifgo", "figo"))
    status, report = run(tmp_path, example("lstm"))
    assert status == 1 and failed(report)[0] == "step1.loss"
    assert any(name.startswith("grad.lstm.") for name in failed(report))


def test_inputs_given_two_ways_or_to_the_ghm_model_are_one_line(tmp_path, capsys):
    assert backward_main(BLOCK + ["--input", "x:float32:2x3x16x16", "--reports", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --input and --shape: give the inputs one way"]
    for argv in (["--input", "x:float32:2x3"], ["--positional"]):
        assert backward_main(argv + ["--reports", str(tmp_path)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {argv[0]} is for a pair of --torch and --paddle "
                                                        "builders"]
    assert not any(tmp_path.iterdir())
