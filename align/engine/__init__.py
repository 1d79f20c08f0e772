"""The model-agnostic alignment engine.

- `compare`: `diff_arrays` (the one pass/fail rule; NaN and Inf always fail),
  comparisons of named tensors and scalars, reprod_log logs; `rows`: rows
  with an absolute bound or exact equality.
- `capture`: torch forward hooks record layer outputs; Paddle hooks diff
  against them live; the ReLU-mask census.
- `paired`: the protocol of a training "side" and the loop that trains two
  sides in lockstep and compares every step.
- `isolate`: each layer on the reference's recorded input and output gradient;
  `weights`: a torch model's weights into a Paddle model as a map file says, with
  `converters` (tensor rules, per-class converters) and `selection` (what each
  side compares, output adapters);
  `divergence`: whether each step's first disagreement has a rounding-level cause.
- `report`: one JSON and one self-contained HTML page per stage, and an index;
  `environment`: the provenance every report records.
- `cli`: the command line every stage shares.
- `atomic_write`: the one way a file is written.

Nothing here imports a model package, a detection library or a client; a test
imports the engine with those blocked. The package imports nothing itself,
so that a model package can use `atomic_write` without loading the rest.
"""
