"""mmdet/torchvision -> Paddle weight conversion: round trip and every error path."""
from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch

from tests.mmdet_fixtures import build_mmdet, mmdet_model_cfg
from paddle_impl.model.detector import RetinaNet
from torch_ref.reference import load_checkpoint, synthesize_checkpoint
from weights_convert import ConversionError, mmdet_to_paddle, torchvision_resnet50_to_paddle

from tests.paths import ROOT  # noqa: E402

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mmdet_ckpt(tmp_path_factory) -> Path:
    return synthesize_checkpoint(tmp_path_factory.mktemp("ckpt") / "ghm.pth", seed=3)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weights_convert", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    ckpt = load_checkpoint(src)
    edit(ckpt["state_dict"])
    torch.save(ckpt, dst)
    return dst


def test_checkpoint_is_in_mmdet_format_with_random_bn_statistics(mmdet_ckpt):
    ckpt = load_checkpoint(mmdet_ckpt)
    assert set(ckpt) == {"meta", "state_dict"}
    sd = ckpt["state_dict"]
    mean, var = sd["backbone.layer2.0.bn1.running_mean"], sd["backbone.layer2.0.bn1.running_var"]
    assert mean.abs().max() > 0.05 and (var - 1).abs().max() > 0.05
    assert "backbone.bn1.num_batches_tracked" in sd


def test_round_trip_fills_every_paddle_tensor(mmdet_ckpt, tmp_path):
    out = mmdet_to_paddle(mmdet_ckpt, tmp_path / "ghm.pdparams")
    sd = load_checkpoint(mmdet_ckpt)["state_dict"]
    model = RetinaNet.from_config()
    loaded = paddle.load(str(out))
    assert set(loaded) == set(model.state_dict())
    model.set_state_dict(loaded)
    state = model.state_dict()
    np.testing.assert_array_equal(state["backbone.layer2.0.bn1._mean"].numpy(),
                                  sd["backbone.layer2.0.bn1.running_mean"].numpy())
    np.testing.assert_array_equal(state["backbone.layer2.0.bn1._variance"].numpy(),
                                  sd["backbone.layer2.0.bn1.running_var"].numpy())
    for key in ("backbone.conv1.weight", "neck.fpn_convs.3.conv.weight",
                "bbox_head.retina_cls.bias", "bbox_head.reg_convs.2.conv.weight"):
        np.testing.assert_array_equal(state[key].numpy(), sd[key].numpy())


def test_mmdet2_checkpoint_without_ghm_buffers_is_accepted(mmdet_ckpt, tmp_path):
    """mmdet 2.x kept GHM edges and momentum as plain attributes, outside the state dict."""
    def drop_ghm_state(sd):
        for key in [k for k in sd if k.startswith("bbox_head.loss_")]:
            del sd[key]
    ckpt = edited_checkpoint(mmdet_ckpt, tmp_path / "v2.pth", drop_ghm_state)
    loaded = paddle.load(str(mmdet_to_paddle(ckpt, tmp_path / "v2.pdparams")))
    assert not loaded["bbox_head.loss_cls.acc_sum"].numpy().any()
    np.testing.assert_array_equal(loaded["bbox_head.loss_cls.edges"].numpy(),
                                  load_checkpoint(mmdet_ckpt)["state_dict"]["bbox_head.loss_cls.edges"].numpy())


def test_ghm_momentum_state_is_carried_over(mmdet_ckpt, tmp_path):
    ckpt = edited_checkpoint(mmdet_ckpt, tmp_path / "m.pth",
                             lambda sd: sd["bbox_head.loss_bbox.acc_sum"].copy_(torch.arange(10.0)))
    loaded = paddle.load(str(mmdet_to_paddle(ckpt, tmp_path / "m.pdparams")))
    np.testing.assert_array_equal(loaded["bbox_head.loss_bbox.acc_sum"].numpy(), np.arange(10.0))


def test_bare_state_dict_and_ddp_prefix_are_accepted(mmdet_ckpt, tmp_path):
    sd = load_checkpoint(mmdet_ckpt)["state_dict"]
    torch.save(collections.OrderedDict((f"module.{k}", v) for k, v in sd.items()), tmp_path / "bare.pth")
    mmdet_to_paddle(tmp_path / "bare.pth", tmp_path / "bare.pdparams")
    assert (tmp_path / "bare.pdparams").is_file()


@pytest.mark.parametrize("edit, expected", [
    (lambda sd: sd.pop("neck.lateral_convs.1.conv.bias"), "missing key(s): ['neck.lateral_convs.1.conv.bias']"),
    (lambda sd: sd.__setitem__("neck.extra_conv.weight", torch.zeros(3)), "unexpected key(s): ['neck.extra_conv.weight']"),
    (lambda sd: sd.__setitem__("bbox_head.retina_cls.weight", torch.zeros(81, 256, 3, 3)),
     "bbox_head.retina_cls.weight: (81, 256, 3, 3)"),
])
def test_bad_checkpoint_is_refused_naming_the_key(mmdet_ckpt, tmp_path, edit, expected):
    bad = edited_checkpoint(mmdet_ckpt, tmp_path / "bad.pth", edit)
    out = tmp_path / "out.pdparams"
    with pytest.raises(ConversionError) as err:
        mmdet_to_paddle(bad, out)
    assert expected in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("out.pdparams*"))
    result = cli("mmdet-to-paddle", bad, out)
    assert result.returncode != 0
    assert expected in result.stderr
    assert not out.exists() and not list(tmp_path.glob("out.pdparams*"))


def test_not_a_checkpoint_is_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("this is not a checkpoint")
    out = tmp_path / "out.pdparams"
    result = cli("mmdet-to-paddle", junk, out)
    assert result.returncode != 0 and "junk.pth" in result.stderr
    assert not out.exists()
    result = cli("mmdet-to-paddle", tmp_path / "absent.pth", out)
    assert result.returncode != 0 and "absent.pth" in result.stderr


class Payload:
    """An arbitrary object: unpickling it would run code, weights_only must refuse."""


def test_arbitrary_pickled_objects_are_not_loaded(mmdet_ckpt, tmp_path):
    ckpt = load_checkpoint(mmdet_ckpt)
    ckpt["meta"]["object"] = Payload()
    torch.save(ckpt, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only"):
        mmdet_to_paddle(tmp_path / "unsafe.pth", tmp_path / "out.pdparams")
    assert not (tmp_path / "out.pdparams").exists()


def test_cli_converts(mmdet_ckpt, tmp_path):
    result = cli("mmdet-to-paddle", mmdet_ckpt, tmp_path / "ok.pdparams")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ok.pdparams").is_file()


@pytest.fixture(scope="module")
def torchvision_style_resnet50(tmp_path_factory) -> Path:
    """A state dict with torchvision's ResNet-50 key layout (mmdet's ResNet shares it) plus ``fc``."""
    torch.manual_seed(0)
    backbone = build_mmdet(mmdet_model_cfg().backbone)
    sd = collections.OrderedDict(backbone.state_dict())
    sd["fc.weight"] = torch.randn(1000, 2048)
    sd["fc.bias"] = torch.randn(1000)
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(sd, path)
    return path


def test_torchvision_resnet50_fills_the_backbone(torchvision_style_resnet50, tmp_path):
    out = torchvision_resnet50_to_paddle(torchvision_style_resnet50, tmp_path / "r50.pdparams")
    loaded = paddle.load(str(out))
    model = RetinaNet.from_config()
    assert set(loaded) == {k for k in model.state_dict() if k.startswith("backbone.")}
    src = torch.load(torchvision_style_resnet50, weights_only=True)
    np.testing.assert_array_equal(loaded["backbone.layer4.2.conv3.weight"].numpy(),
                                  src["layer4.2.conv3.weight"].numpy())
    result = cli("torchvision-resnet50", torchvision_style_resnet50, tmp_path / "cli.pdparams")
    assert result.returncode == 0, result.stderr


def test_torchvision_resnet50_missing_key(torchvision_style_resnet50, tmp_path):
    sd = torch.load(torchvision_style_resnet50, weights_only=True)
    del sd["layer3.1.bn2.running_var"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"layer3\.1\.bn2\.running_var"):
        torchvision_resnet50_to_paddle(tmp_path / "bad.pth", tmp_path / "out.pdparams")
    assert not (tmp_path / "out.pdparams").exists()
