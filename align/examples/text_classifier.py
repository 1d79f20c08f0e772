"""A small text classifier written from each framework's own layers: token embedding, a two-layer
Transformer encoder under a padding mask, the mean over the unpadded tokens, a linear layer.

    python -m align.pair --torch align.examples.text_classifier:build_torch \
        --paddle align.examples.text_classifier:build_paddle --map align/examples/text_classifier_map.json \
        --input ids:int64:2x16:0..1000 --input mask:bool:2x16 --isolate --backward --dtype float64

Both take ``ids`` ``(N, S)`` int64 and ``mask`` ``(N, S)`` bool, True at a padded position
(as torch's ``src_key_padding_mask``; Paddle's attention mask is True where attention is
allowed, so its side inverts it), and return logits ``(N, 3)``. A sequence whose every
position is padded keeps its first token unpadded, so the mean is over at least one.
"""
from __future__ import annotations

from pathlib import Path

NAME_MAP = Path(__file__).with_name("text_classifier_map.json")
VOCAB, D_MODEL, HEADS, FEEDFORWARD, LAYERS, CLASSES = 1000, 32, 4, 64, 2, 3


def build_torch():
    import torch

    class TextClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
            layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEEDFORWARD, batch_first=True)
            # Nested tensors would zero the padded positions, which Paddle computes.
            self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
            self.fc = torch.nn.Linear(D_MODEL, CLASSES)

        def forward(self, ids, mask):
            mask = mask.clone()
            mask[:, 0] = False
            x = self.encoder(self.embed(ids), src_key_padding_mask=mask)
            keep = (~mask).unsqueeze(-1).to(x.dtype)
            return self.fc((x * keep).sum(1) / keep.sum(1))

    torch.manual_seed(0)
    return TextClassifier().eval()


def build_paddle():
    import paddle

    class TextClassifier(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.embed = paddle.nn.Embedding(VOCAB, D_MODEL)
            self.encoder = paddle.nn.TransformerEncoder(
                paddle.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEEDFORWARD), LAYERS)
            self.fc = paddle.nn.Linear(D_MODEL, CLASSES)

        def forward(self, ids, mask):
            mask = mask.clone()
            mask[:, 0] = False
            allowed = paddle.logical_not(mask).unsqueeze([1, 2])  # (N, 1, 1, S)
            x = self.encoder(self.embed(ids), src_mask=allowed)
            keep = paddle.logical_not(mask).unsqueeze(-1).astype(x.dtype)
            return self.fc((x * keep).sum(1) / keep.sum(1))

    model = TextClassifier()
    model.eval()
    return model
