"""Cross-framework alignment: a model-agnostic engine and the GHM RetinaNet as its client.

- `align.engine`: capture named tensors from a Paddle layer and a torch
  module, diff them, train two models in lockstep, render reports, run a
  stage from the command line. It imports nothing of the model it checks.
- `align.ghm`: the GHM RetinaNet pair (mmdet's model and ours), its seeded
  inputs and fake batches, and the two sides of the paired training loop.
- `align.forward`, `align.loss`, `align.backward`, `align.data`,
  `align.predict`, `align.metric`, `align.train`: the stages, each what is
  specific to it, run as ``python -m align.<stage>``.
"""
import warnings

# Paddle warns at import that ccache is absent; it only matters for compiling
# custom operators, which nothing here does.
warnings.filterwarnings("ignore", message="No ccache found")
