"""A two-layer bidirectional LSTM with a linear head, ``torch.nn.LSTM`` against ``paddle.nn.LSTM``.

    python -m align.pair --torch align.examples.lstm:build_torch --paddle align.examples.lstm:build_paddle \
        --map align/examples/lstm_map.json --shape 2x12x16 --isolate --backward --dtype float64

Both name their weights ``weight_ih_l<k>[_reverse]``, ``weight_hh_l<k>``, ``bias_ih_l<k>``,
``bias_hh_l<k>`` with the gates stacked in the same order (i, f, g, o), which the built-in
converter checks against `align.engine.converters.GATES`. Input ``(N, T, 16)``, batch first;
outputs: the head's ``(N, T, 4)`` and the final hidden and cell states ``(4, N, 32)``.
"""
from __future__ import annotations

from pathlib import Path

NAME_MAP = Path(__file__).with_name("lstm_map.json")
FEATURES, HIDDEN, CLASSES = 16, 32, 4


def build_torch():
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
            self.head = torch.nn.Linear(2 * HIDDEN, CLASSES)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.head(out), h, c

    torch.manual_seed(0)
    return Tagger().eval()


def build_paddle():
    import paddle

    class Tagger(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.lstm = paddle.nn.LSTM(FEATURES, HIDDEN, num_layers=2, direction="bidirect")
            self.head = paddle.nn.Linear(2 * HIDDEN, CLASSES)

        def forward(self, x):
            out, (h, c) = self.lstm(x)
            return self.head(out), h, c

    model = Tagger()
    model.eval()
    return model
