"""Backward stage: several training steps in both frameworks, compared step by step."""
