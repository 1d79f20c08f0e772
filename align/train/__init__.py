"""Training alignment stage on the tiny COCO: ``python -m align.train``."""
