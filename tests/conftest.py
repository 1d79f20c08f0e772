"""Shared pytest settings: the project is installed in the virtual environment (``make setup``)."""
