"""Prediction alignment stage: ``python -m align.predict``."""
