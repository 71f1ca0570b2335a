"""Strongroom development kit: never installed in production images (see dev/pyproject.toml)."""
