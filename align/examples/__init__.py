"""Example model pairs for ``python -m align.pair`` (see README, "Align your own model")."""
