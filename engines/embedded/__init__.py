"""Embedded default engines: models that ship inside PyPI packages, no download."""
