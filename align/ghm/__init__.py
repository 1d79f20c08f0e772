"""The GHM RetinaNet as the alignment engine's client.

- `pair`: the converted checkpoint pair, mmdet's model and ours built from
  it in a given precision, seeded images.
- `fake_batch`: seeded ground truth for the loss and backward stages.
- `sides`: mmdet's and Paddle's training sides of the engine's paired loop.
- `schedule`: the learning-rate schedule replayed on both frameworks.
- `suite`: the stage order and the packages every report records.
"""
