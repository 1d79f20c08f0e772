"""``bench.bench_infer``'s ceiling: the convolutions' operations and one convolution's speed (no figure is judged)."""
from __future__ import annotations

import torch

from bench.bench_infer import conv_flops, conv_speeds


class _TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = torch.nn.Conv2d(8, 4, 1, groups=2)

    def _forward(self, x):
        return self.grouped(self.stem(x))


def test_conv_flops_counts_two_per_multiply_add_with_groups():
    # stem: 3*3*3 taps x 8 channels x 16x24 outputs; grouped 1x1: 4 taps x 4 channels x 16x24.
    want = 2 * (27 * 8 * 16 * 24 + 4 * 4 * 16 * 24)
    assert conv_flops(_TwoConvs(), (32, 48)) == want


def test_conv_speeds_times_both_libraries_on_the_p3_shape():
    speeds = conv_speeds((64, 96), threads=1, repeats=1, channels=8)
    assert speeds["shape"] == [1, 8, 8, 12]
    assert set(speeds["gflop_per_s"]) == {"mmdet", "onnxruntime"}
    assert all(v > 0 for v in speeds["gflop_per_s"].values())
