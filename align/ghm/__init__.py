"""The GHM RetinaNet as the alignment engine's client.

- `pair`: the converted checkpoint pair, mmdet's model and ours built from
  it in a given precision, seeded images.
- `fake_batch`: seeded ground truth for the loss and backward stages.
- `sides`: mmdet's and Paddle's training sides of the engine's paired loop.
- `schedule`: the learning-rate schedule replayed on both frameworks.
- `pipelines`: mmdet's and our data pipelines on the seeded tiny COCO.
- `recorders`: per call of either side's GHM losses, bin counts and ``acc_sum``.
- `suite`: the stage order and the packages every report records.
"""
