"""How far mmdet's and our GHM-C loss are from the exact value, on real P3 inputs.

``python -m bench.ghm_precision [--shape 2x3x800x1344]`` runs the loss stage's
default inputs (mmdet's forward of the seeded checkpoint on seeded images, the
default fake ground truth, mmdet's own targets), takes the P3 level
(302,400 anchors x 80 classes at 800x1344), and evaluates one GHM-C call three
ways: mmdet's ``GHMC``, ours, and the GHM-C definition in float64 (bins from
mmdet's float32 comparisons, per-bin weights ``tot / acc`` over the non-empty
bins, the weighted sum divided by ``tot + eps``). It prints each one's
relative error against the float64 value.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from common.arguments import non_negative


def float64_ghmc(pred, labels, label_weights, bins: int, momentum: float) -> float:
    """The first GHM-C call on fresh state, evaluated in float64."""
    import torch
    import torch.nn.functional as F

    num_classes = pred.shape[1]
    target = torch.zeros_like(pred)
    rows = torch.nonzero((labels >= 0) & (labels < num_classes), as_tuple=True)[0]
    target[rows, labels[rows]] = 1
    valid = label_weights.view(-1, 1).expand_as(pred) > 0
    g = (pred.sigmoid() - target).abs()
    edges = torch.arange(bins + 1).float() / bins
    edges[-1] += 1e-6
    tot = max(float(valid.sum()), 1.0)
    weights = torch.zeros(pred.shape, dtype=torch.float64)
    nonempty = 0
    for i in range(bins):
        in_bin = (g >= edges[i]) & (g < edges[i + 1]) & valid
        count = int(in_bin.sum())
        if count:
            # First call: acc = momentum * 0 + (1 - momentum) * count.
            weights[in_bin] = tot / ((1.0 - momentum) * count if momentum > 0 else count)
            nonempty += 1
    weights /= max(nonempty, 1)
    loss = F.binary_cross_entropy_with_logits(pred.double(), target.double(), reduction="none")
    return float((loss * weights).sum()) / (tot + float(np.finfo(np.float32).eps))


def main(argv=None) -> int:
    import paddle
    import torch
    from mmdet.models.losses import GHMC as MMDetGHMC

    from align.ghm.pair import build_torch_model, parse_shape, prepare_checkpoints, seeded_images
    from align.ghm.fake_batch import default_batch
    from align.loss.stage import mmdet_inputs
    from paddle_impl.config import get_config
    from paddle_impl.model.ghm_loss import GHMC

    p = argparse.ArgumentParser(prog="python -m bench.ghm_precision", description=__doc__)
    p.add_argument("--shape", default="2x3x800x1344")
    p.add_argument("--seed", type=non_negative, default=0)
    args = p.parse_args(argv)
    shape = parse_shape(args.shape)
    model = build_torch_model(prepare_checkpoints(None, args.seed))
    head = model.bbox_head
    batch = default_batch(shape[2:])
    with torch.no_grad():
        cls_scores, _ = head(model.extract_feat(torch.from_numpy(seeded_images(shape, args.seed))))
        gts, metas = mmdet_inputs(batch)
        anchors, valid = head.get_anchors([c.shape[-2:] for c in cls_scores], metas, device="cpu")
        labels, label_weights, *_ = head.get_targets(anchors, valid, gts, metas)
    num_classes = cls_scores[0].shape[1] // 9
    pred = cls_scores[0].permute(0, 2, 3, 1).reshape(-1, num_classes).contiguous()
    lab, lw = labels[0].reshape(-1), label_weights[0].reshape(-1)

    opts = get_config()["bbox_head"]["loss_cls"]
    exact = float64_ghmc(pred, lab, lw, opts["bins"], opts["momentum"])
    with torch.no_grad():
        ref = float(MMDetGHMC(**opts)(pred, lab, lw))
    ours = float(GHMC(**opts)(paddle.to_tensor(pred.numpy()), paddle.to_tensor(lab.numpy()),
                              paddle.to_tensor(lw.numpy())))
    result = {
        "elements": int(pred.numel()),
        "float64": exact,
        "mmdet": ref,
        "paddle": ours,
        "mmdet_rel_error": abs(ref - exact) / abs(exact),
        "paddle_rel_error": abs(ours - exact) / abs(exact),
        "paddle_vs_mmdet": abs(ours - ref) / abs(ref),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
