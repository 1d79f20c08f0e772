"""Deployment alignment stage: ``python -m align.deploy``."""
