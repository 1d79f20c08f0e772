"""Builders for `python -m align.pair` and `python -m align.backward` in the tests: the small block pair,
builders that fail and loss factories."""
from __future__ import annotations


def block_torch():
    import torch

    from tests.align.test_isolate import TorchBlock

    torch.manual_seed(0)  # the same weights at every build: a cached reference stays valid
    return TorchBlock().eval()


def block_paddle():
    from tests.align.test_isolate import PaddleBlock

    return PaddleBlock().eval()


def raising():
    raise RuntimeError("cannot open /nowhere/weights.pth")


def nested_failure():
    return {}["backbone"]


def block_paddle_wrong_backward():
    """The Paddle block with a ReLU whose backward is 1e-3 too large: the forward agrees."""
    from tests.align.faults import WrongBackwardReLU
    from tests.align.test_isolate import PaddleBlock

    return PaddleBlock(relu=WrongBackwardReLU()).eval()


def block_paddle_carried():
    """The Paddle block holding the torch block's weights already (for ``--no-carry``)."""
    from align.engine.weights import NameMap, carry_weights

    paddle_block = block_paddle()
    carry_weights(block_torch(), paddle_block, NameMap())
    return paddle_block


def squared_loss(framework: str):
    """A loss factory for ``--loss``: mean squared distance of the output from each input's mean."""
    def loss(output, inputs):
        return ((output - inputs.mean()) ** 2).mean()
    return loss


def not_callable_loss(framework: str):
    return 1.0


def block_torch_wrapped():
    """The torch block one level down (``body.conv1``, ``body.relu``, ...): a pair that needs a name map."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = block_torch()

        def forward(self, x):
            return self.body(x)

    return Wrapped().eval()
