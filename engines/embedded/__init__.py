"""Embedded default engines: models that ship inside PyPI packages, no download."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_path(package: str, *parts: str, what: str) -> Path:
    """A file or folder inside an installed model package, found through the package's
    own files (never a hard-coded path). `what` names it in the error."""
    try:
        root = resources.files(package)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the embedded {what} is not installed: pip install 'avatard[embedded]'"
        ) from error
    return Path(str(root.joinpath(*parts)))
