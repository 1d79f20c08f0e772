"""Small model pairs whose weights need more than a name: a packed projection, a parent-owned
parameter, a registered converter. Builders for ``--torch`` / ``--paddle`` and the tests."""
from __future__ import annotations

import numpy as np


def packed_torch():
    """``qkv`` Linear(8, 24) packs three projections; ``scale`` ``(8,)`` is owned by the root."""
    import torch

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)
            self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return (q * k + v) * self.gamma

    torch.manual_seed(0)
    return Packed().eval()


def packed_paddle():
    import paddle

    class Split(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 8)
            self.alpha = self.create_parameter([8])

        def forward(self, x):
            return (self.q(x) * self.k(x) + self.v(x)) * self.alpha

    model = Split()
    model.eval()
    return model


def residual_torch():
    """A block ``x + scale * fc(x)`` whose ``scale`` ``(8,)`` its parent owns, then a head."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.scale = torch.nn.Parameter(torch.linspace(0.1, 0.9, 8))

        def forward(self, x):
            return x + self.scale * self.fc(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(x))

    torch.manual_seed(0)
    return Net().eval()


def residual_paddle():
    import paddle

    class Block(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc = paddle.nn.Linear(8, 8)
            self.scale = self.create_parameter([8])

        def forward(self, x):
            return x + self.scale * self.fc(x)

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = paddle.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(x))

    model = Net()
    model.eval()
    return model


def gamma_to_alpha(name: str, array: np.ndarray, module) -> dict:
    """A registered converter of the ``Packed`` class: its own ``gamma`` is Paddle's ``alpha``."""
    return {"alpha": array} if name == "gamma" else {name: array}


def recurrent_torch(kind: str):
    """A torch ``kind`` ("GRU" or "RNN"), 2 layers, bidirectional, (N, T, 6) -> (N, T, 2 * 5)."""
    import torch

    torch.manual_seed(0)
    return getattr(torch.nn, kind)(6, 5, num_layers=2, bidirectional=True, batch_first=True).eval()


def recurrent_paddle(kind: str):
    import paddle

    model = getattr(paddle.nn, {"GRU": "GRU", "RNN": "SimpleRNN"}[kind])(6, 5, num_layers=2, direction="bidirect")
    model.eval()
    return model


def attention_torch():
    """torch's attention, sequence first (``batch_first=False``), under a bool padding mask:
    ``x`` ``(N, S, 8)`` and ``mask`` ``(N, S)`` True at padding -> ``(N, S, 8)``."""
    import torch

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2)

        def forward(self, x, mask):
            mask = mask.clone()
            mask[:, 0] = False
            x = x.transpose(0, 1)
            return self.attn(x, x, x, mask, need_weights=False)[0].transpose(0, 1)

    torch.manual_seed(0)
    return Attend().eval()


def attention_paddle():
    import paddle

    class Attend(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.attn = paddle.nn.MultiHeadAttention(8, 2)

        def forward(self, x, mask):
            mask = mask.clone()
            mask[:, 0] = False
            return self.attn(x, x, x, attn_mask=paddle.logical_not(mask).unsqueeze([1, 2]))

    model = Attend()
    model.eval()
    return model
