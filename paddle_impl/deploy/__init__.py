"""Deployment: the exported detector (``python -m paddle_impl.export``) and its inference engines."""
