"""One Transformer encoder layer, ``torch.nn.TransformerEncoderLayer`` against
``paddle.nn.TransformerEncoderLayer``, as both frameworks ship them; no weight code.

    python -m align.pair --torch align.examples.transformer:build_torch \
        --paddle align.examples.transformer:build_paddle --map align/examples/transformer_map.json \
        --shape 2x16x64 --isolate --backward --dtype float64

torch packs the attention's q, k and v projections in ``self_attn.in_proj_weight``
``(3E, E)``, Paddle has ``q_proj``, ``k_proj``, ``v_proj``: the built-in
MultiheadAttention converter splits it, and the attention is compared as a whole (torch
never calls its ``out_proj``). The input is ``(N, S, E)``, batch first on both sides.
"""
from __future__ import annotations

from pathlib import Path

NAME_MAP = Path(__file__).with_name("transformer_map.json")
D_MODEL, HEADS, FEEDFORWARD = 64, 4, 128


def build_torch(d_model: int = D_MODEL, heads: int = HEADS, feedforward: int = FEEDFORWARD):
    import torch

    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(d_model, heads, feedforward, batch_first=True).eval()


def build_paddle(d_model: int = D_MODEL, heads: int = HEADS, feedforward: int = FEEDFORWARD):
    import paddle

    layer = paddle.nn.TransformerEncoderLayer(d_model, heads, feedforward)
    layer.eval()
    return layer
