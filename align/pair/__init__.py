"""Align any torch module with any Paddle layer: `align_pair` and ``python -m align.pair``."""
