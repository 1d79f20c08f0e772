"""Pairs written by the frameworks' authors, through the forward stage: maps that say what a port
does, what is compared, named inputs, float64. Real torch against real Paddle, seeded, small."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from align.engine import converters
from align.engine.converters import TensorRule
from align.engine.weights import NameMap, carry_weights, plan_conversion
from align.forward.stage import ForwardOptions, first_divergence, run_forward
from align.pair.__main__ import main as pair_main
from align.pair.inputs import parse_spec, seeded_inputs
from align.pair.run import builder_pair
from common.errors import InputError
from tests.align import port_builders

EXAMPLES = Path(__file__).resolve().parents[2] / "align" / "examples"
TEXT_INPUTS = ["ids:int64:2x16:0..1000", "mask:bool:2x16"]


def run(tmp_path, example: str, *, dtype="float64", shape=None, inputs=(), map_file=None, **options):
    """The example pair ``align.examples.<example>`` (or a ``module`` path) through `run_forward`."""
    module = example if ":" in example else f"align.examples.{example}"
    torch_spec, paddle_spec = (f"{module}:build_torch", f"{module}:build_paddle") if ":" not in example else example.split("|")
    if map_file is None and ":" not in example:
        map_file = EXAMPLES / f"{example}_map.json"
    pair = builder_pair(torch_spec, paddle_spec, name_map_file=map_file, carry=True, shape=shape, seed=0,
                        stage="port", spill=False, input_specs=list(inputs), dtype=dtype)
    tol = 1e-9 if dtype == "float64" else 1e-5
    opts = ForwardOptions(torch=torch_spec, paddle=paddle_spec, rel_tol=tol, mean_tol=tol, reports=tmp_path,
                          build_dir=tmp_path / "build", **options)
    return run_forward(opts, pair)


@pytest.mark.parametrize("example, shape, inputs", [("transformer", (2, 6, 64), ()),
                                                    ("lstm", (2, 5, 16), ()),
                                                    ("text_classifier", None, TEXT_INPUTS)])
def test_an_example_pair_agrees_in_float64_with_isolation_and_gradients(tmp_path, example, shape, inputs):
    result = run(tmp_path, example, shape=shape, inputs=inputs, isolate=True, backward=True)
    assert result.passed, first_divergence(result)
    assert result.headline.value < 1e-9
    assert result.meta["dtype"] == "float64"


def test_the_transformer_pair_agrees_in_float32_without_a_line_of_weight_code(tmp_path):
    result = run(tmp_path, "transformer", dtype="float32", shape=(2, 6, 64), map_file=None)
    assert result.passed, first_divergence(result)
    names = [row.name for row in result.layers]
    # The attention is compared whole: torch never calls its out_proj, Paddle calls four Linears.
    assert "self_attn" in names and not any("proj" in n for n in names)


@pytest.mark.parametrize("example, shape, inputs, parameter, named", [
    ("transformer", (2, 6, 64), (), "self_attn.k_proj.weight", "self_attn"),
    ("lstm", (2, 5, 16), (), "lstm.weight_hh_l1_reverse", "lstm[0]"),
    ("text_classifier", None, TEXT_INPUTS, "embed.weight", "embed"),
    ("text_classifier", None, TEXT_INPUTS, "encoder.layers.1.self_attn.v_proj.bias", "encoder.layers.1.self_attn"),
])
def test_a_perturbed_parameter_is_named_at_its_layer(tmp_path, example, shape, inputs, parameter, named):
    result = run(tmp_path, example, shape=shape, inputs=inputs, perturb=parameter)
    assert not result.passed and first_divergence(result) == named


def test_a_wrong_gate_order_fails_the_lstm_pair(tmp_path, monkeypatch):
    monkeypatch.setitem(converters.GATES, "LSTM", ("ifgo", "figo"))
    result = run(tmp_path, "lstm", shape=(2, 5, 16))
    assert not result.passed and first_divergence(result) == "lstm[0]"


def test_the_multihead_attention_converter_splits_the_packed_projection():
    import torch

    from align.examples import transformer

    t, p = transformer.build_torch(16, 2, 32), transformer.build_paddle(16, 2, 32)
    conversions, _ = carry_weights(t, p, NameMap())
    packed = t.self_attn.in_proj_weight.detach().numpy()
    for i, name in enumerate("qkv"):
        np.testing.assert_array_equal(getattr(p.self_attn, f"{name}_proj").weight.numpy(), packed[16 * i:16 * (i + 1)].T)
    assert {c.how for c in conversions} >= {"MultiheadAttention", "Linear", "default"}
    assert isinstance(t, torch.nn.TransformerEncoderLayer)


def test_tensor_rules_and_a_registered_converter_carry_a_packed_model():
    import paddle
    import torch

    t, p = port_builders.packed_torch(), port_builders.packed_paddle()
    names = NameMap(tensors=[TensorRule(("qkv.weight",), ("q.weight", "k.weight", "v.weight"), transpose=True),
                             TensorRule(("qkv.bias",), ("q.bias", "k.bias", "v.bias"))],
                    converters={"Packed": "tests.align.port_builders:gamma_to_alpha"})
    carry_weights(t, p, names)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(p(paddle.to_tensor(x)).numpy(), t(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    # Back the other way: three torch tensors merged into one Paddle tensor, transposed.
    merge = TensorRule(("q.weight", "k.weight", "v.weight"), ("qkv.weight",), axis=1, transpose=True)
    merged = merge.apply([p.q.weight.numpy(), p.k.weight.numpy(), p.v.weight.numpy()])[0]
    np.testing.assert_array_equal(merged, t.qkv.weight.detach().numpy())
    assert TensorRule(("a",), ("b",), reshape=(2, 3)).apply([np.arange(6)])[0].shape == (2, 3)


def test_a_rule_or_converter_that_matches_nothing_is_one_named_error(tmp_path, capsys):
    t, p = port_builders.packed_torch(), port_builders.packed_paddle()
    with pytest.raises(ValueError, match=r"tensor rule \['qkv.weights'\] .*no torch key 'qkv.weights'"):
        plan_conversion(t, p, NameMap(tensors=[TensorRule(("qkv.weights",), ("q.weight",))]))
    with pytest.raises(ValueError, match=r"converters: 'Packd' is no class"):
        plan_conversion(t, p, NameMap(converters={"Packd": "tests.align.port_builders:gamma_to_alpha"}))
    bad = tmp_path / "map.json"
    for document, message in [
            ({"tensors": [{"torch": "fc.w", "paddle": "fc.weight"}]}, "no torch key 'fc.w'"),
            ({"ignore": ["nowhere"]}, "ignore: 'nowhere' is no torch module and no Paddle layer"),
            ({"compare_at": ["blk"]}, "compare_at: 'blk' is no module of the torch model"),
            ({"outputs": {"output": {"torch": "first"}}}, "an adapter is an index"),
            ({"prefix": []}, "unknown key(s) ['prefix']")]:
        bad.write_text(json.dumps(document))
        argv = ["--torch", "tests.align.port_builders:residual_torch", "--paddle",
                "tests.align.port_builders:residual_paddle", "--shape", "2x8", "--map", str(bad), "--reports", str(tmp_path / "r")]
        assert pair_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_parameter_its_parent_owns_is_named_at_the_parent(tmp_path):
    spec = "tests.align.port_builders:residual_torch|tests.align.port_builders:residual_paddle"
    result = run(tmp_path, spec, shape=(2, 8))
    assert result.passed, first_divergence(result)
    assert [row.name for row in result.layers] == ["block.fc", "block", "head"]
    result = run(tmp_path, spec, shape=(2, 8), perturb="block.scale")
    assert first_divergence(result) == "block"


def test_ignore_and_output_adapters(tmp_path):
    names = tmp_path / "map.json"
    names.write_text(json.dumps({"ignore_classes": ["Dropout"], "ignore": ["norm2"],
                                 "outputs": {"output": {"torch": [0], "paddle": [0]}}}))
    result = run(tmp_path, "transformer", shape=(2, 6, 64), map_file=names)
    assert result.passed
    layer_names = [row.name for row in result.layers]
    assert "norm2" not in layer_names and not any("dropout" in n for n in layer_names)


def test_input_specs_and_their_errors():
    inputs = seeded_inputs(TEXT_INPUTS + ["x:float32:2x3"], seed=0)
    assert inputs["ids"].dtype == np.int64 and inputs["ids"].min() >= 0 and inputs["ids"].max() < 1000
    assert inputs["mask"].dtype == bool and inputs["x"].shape == (2, 3)
    assert parse_spec("x:float64:4:-1..1") == ("x", "float64", (4,), (-1.0, 1.0))
    for spec, message in [("ids:int64:2x16", "needs its range"), ("ids:int8:2x16:0..4", "dtype 'int8'"),
                          ("ids:int64:2xy:0..4", "shape '2xy'"), ("m:bool:2:0..1", "takes no range"),
                          ("ids:int64:2x16:5..1", "low < high"), ("2x16", "expected name:dtype:shape")]:
        with pytest.raises(InputError, match=message) as caught:
            seeded_inputs([spec], 0)
        assert str(caught.value).startswith(f"--input {spec}: ")


def test_inputs_from_an_npz_file_and_a_pickled_one_refused(tmp_path, capsys):
    good, bad = tmp_path / "inputs.npz", tmp_path / "pickled.npz"
    rng = np.random.default_rng(0)
    np.savez(good, ids=rng.integers(0, 1000, (2, 16)), mask=rng.random((2, 16)) < 0.3)
    np.savez(bad, ids=np.array([{"a": 1}], dtype=object))
    base = ["--torch", "align.examples.text_classifier:build_torch", "--paddle",
            "align.examples.text_classifier:build_paddle", "--map", str(EXAMPLES / "text_classifier_map.json"),
            "--reports", str(tmp_path / "r"), "--dtype", "float64"]
    assert pair_main(base + ["--inputs", str(good)]) == 0
    # The file's order is the builders' order of arguments: passed positionally too.
    assert pair_main(base + ["--inputs", str(good), "--positional"]) == 0
    assert pair_main(base + ["--inputs", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --inputs {bad}: cannot read")


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_the_recurrent_converters_carry_a_gru_and_a_simple_rnn(tmp_path, kind, monkeypatch):
    from align.pair.run import align_pair

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((2, 4, 6)).astype(np.float32)
    result = align_pair(port_builders.recurrent_torch(kind), port_builders.recurrent_paddle(kind), inputs,
                        backward=True, reports=tmp_path, build_dir=tmp_path / "build")
    assert result.passed, first_divergence(result)
    if kind == "GRU":  # r and z swapped: the outputs part
        monkeypatch.setitem(converters.GATES, "GRU", ("rzn", "zrn"))
        result = align_pair(port_builders.recurrent_torch(kind), port_builders.recurrent_paddle(kind), inputs,
                            reports=tmp_path, build_dir=tmp_path / "build")
        assert not result.passed and first_divergence(result) == "output[0]"


def test_a_fault_float32_rounding_hides_is_named_in_float64(tmp_path):
    hidden = run(tmp_path, "transformer", dtype="float32", shape=(2, 6, 64), perturb="linear2.weight",
                 perturb_scale=1e-6)
    assert hidden.passed
    named = run(tmp_path, "transformer", shape=(2, 6, 64), perturb="linear2.weight", perturb_scale=1e-6)
    assert not named.passed and first_divergence(named) == "linear2"


@pytest.mark.parametrize("example, shape, parameter, named, isolated", [
    ("transformer", (2, 6, 64), "self_attn.q_proj.weight", "self_attn", True),
    ("lstm", (2, 5, 16), "lstm.weight_ih_l0", "lstm[0]", False)])
def test_with_isolation_a_perturbed_layer_is_named(tmp_path, example, shape, parameter, named, isolated):
    result = run(tmp_path, example, shape=shape, perturb=parameter, isolate=True, backward=True)
    assert not result.passed and first_divergence(result) == named
    row = next(r for r in result.layers if r.name == named)
    # The attention runs on its own; the LSTM (outputs (out, (h, c))) keeps its accumulated row.
    assert row.reason.startswith("not isolated: accumulated error") != isolated


def test_an_attention_under_a_bool_padding_mask_is_isolated_sequence_first(tmp_path):
    from align.engine.isolate import TorchCallRecorder, isolated_forward, spill_store
    from align.engine.selection import select

    t, p = port_builders.attention_torch(), port_builders.attention_paddle()
    carry_weights(t, p, NameMap())
    rng = np.random.default_rng(0)
    x, mask = rng.standard_normal((2, 5, 8)).astype(np.float32), rng.random((2, 5)) < 0.5
    selection = select(t, p, NameMap().layer, NameMap().compare)
    import torch

    with spill_store(False) as store:
        with TorchCallRecorder(t, store, names=selection.torch) as recorder, torch.no_grad():
            t(torch.from_numpy(x), torch.from_numpy(mask))
        assert store.get("attn/key_padding_mask").dtype == bool
        rows = isolated_forward(recorder.calls, store, p, NameMap())
    assert [r.name for r in rows] == ["attn"] and rows[0].passed and rows[0].rel_max < 1e-6


def test_builders_that_carry_the_weights_themselves_are_compared_through_the_same_conversions(tmp_path):
    from align.examples import transformer
    from align.pair.run import align_pair

    t, p = transformer.build_torch(16, 2, 32), transformer.build_paddle(16, 2, 32)
    carry_weights(t, p, NameMap())  # the user's own weight code, as --no-carry expects
    inputs = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    result = align_pair(t, p, inputs, carry=False, backward=True, reports=tmp_path, build_dir=tmp_path / "build")
    assert result.passed, first_divergence(result)
    assert {"grad.self_attn.q_proj.weight", "grad.self_attn.v_proj.bias"} <= {r.name for r in result.tensors}
