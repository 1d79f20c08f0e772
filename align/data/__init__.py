"""Data-loading alignment stage: ``python -m align.data``."""
