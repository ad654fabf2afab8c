"""Loading the official Ditto checkpoint folder, and its pickled config, safely.

Layout the user brings (paths relative to the checkpoint folder)::

    ditto_pytorch/models/appearance_extractor.pth   plain state_dict
    ditto_pytorch/models/motion_extractor.pth       plain state_dict
    ditto_pytorch/models/warp_network.pth           plain state_dict
    ditto_pytorch/models/decoder.pth                plain state_dict
    ditto_pytorch/models/stitch_network.pth         {'retarget_shoulder': state_dict}
    ditto_pytorch/models/lmdm_v0.4_hubert.pth       {'model_state_dict': state_dict}
    ditto_cfg/v0.4_hubert_cfg_pytorch.pkl           pipeline config (pickle)

Weights are read with ``torch.load(weights_only=True)``; the config with
`RestrictedUnpickler`, which rebuilds only plain containers, scalars, strings and numpy
arrays. Errors name the file, the key and the shapes involved.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

CFG_RELPATH = "ditto_cfg/v0.4_hubert_cfg_pytorch.pkl"
MODELS_RELDIR = "ditto_pytorch/models"
AUX_RELDIR = "ditto_pytorch/aux_models"

# module name -> (file under ditto_pytorch/models, key of the state_dict in the container
# or None for a bare state_dict, whether a DDP 'module.' prefix may be present)
CHECKPOINT_FILES: dict[str, tuple[str, str | None, bool]] = {
    "appearance_extractor": ("appearance_extractor.pth", None, False),
    "motion_extractor": ("motion_extractor.pth", None, False),
    "warp_network": ("warp_network.pth", None, False),
    "decoder": ("decoder.pth", None, False),
    "stitch_network": ("stitch_network.pth", "retarget_shoulder", True),
    "lmdm": ("lmdm_v0.4_hubert.pth", "model_state_dict", False),
}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, malformed or does not fit the network."""


def checkpoint_path(root: Path | str, module: str) -> Path:
    """Path of `module`'s .pth under a checkpoint folder (the folder holding ditto_pytorch)."""
    filename = CHECKPOINT_FILES[module][0]
    return Path(root) / MODELS_RELDIR / filename


def read_state_dict(path: Path | str, module: str) -> dict[str, torch.Tensor]:
    """Read `module`'s state_dict from its official container at `path`."""
    path = Path(path)
    _, container_key, strip_ddp = CHECKPOINT_FILES[module]
    if not path.is_file():
        raise CheckpointError(f"{module}: checkpoint file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; report them all alike
        raise CheckpointError(f"{module}: cannot read {path}: {exc}") from exc
    if container_key is not None:
        if not isinstance(obj, Mapping) or container_key not in obj:
            found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(
                f"{module}: {path} should be a dict with key {container_key!r}, found {found}"
            )
        obj = obj[container_key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{module}: {path} does not hold a state_dict ({type(obj)})")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{module}: {path}: entry {key!r} is not a tensor")
        if strip_ddp and key.startswith("module."):
            # Saved from a DistributedDataParallel wrapper.
            key = key[len("module.") :]
        state[key] = value
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing/unexpected key and shape mismatch."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:10]) + _more(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected[:10]) + _more(unexpected))
    for key, ref in expected.items():
        if key in state and tuple(state[key].shape) != tuple(ref.shape):
            problems.append(
                f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _more(items: list[str]) -> str:
    return f" (+{len(items) - 10} more)" if len(items) > 10 else ""


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strict load after a readable check; dtypes are converted to the model's."""
    check_state_dict(model, state, source)
    model.load_state_dict(dict(state), strict=True)
    return model


def load_checkpoint(model: nn.Module, root: Path | str, module: str) -> nn.Module:
    """Load `module`'s official file under checkpoint folder `root` into `model`.

    For the LMDM, pass the `LMDM` wrapper or its `.model`; the file holds the latter.
    """
    target = getattr(model, "model", model) if module == "lmdm" else model
    path = checkpoint_path(root, module)
    load_into(target, read_state_dict(path, module), f"{module} ({path})")
    return model


# --------------------------------------------------------------------------- config


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a global outside the allow-list."""


# Globals a numpy array or scalar needs to be rebuilt (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Protocol 5 rebuilds contiguous arrays from a raw buffer with this helper.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Pickles of plain containers made by Python 2 era tools reference these.
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        # Protocols 0-2 store bytes (numpy's raw array data) as latin-1 text re-encoded
        # through this pure str -> bytes function.
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals (numpy arrays/dtypes/scalars
    and a few builtin containers); anything else raises `UnsafePickleError` naming the
    refused global before it is imported, let alone called."""

    def find_class(self, module: str, name: str) -> Any:
        # Old protocols name Python 2 modules (`__builtin__.set`); map them the way pickle
        # itself would before checking, so allowed types pass and nothing else does.
        import _compat_pickle

        if module in _compat_pickle.IMPORT_MAPPING or (module, name) in \
                _compat_pickle.NAME_MAPPING:  # a Python 2 name: Python 3 never writes one
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refused global {module}.{name} in pickle")
        return super().find_class(module, name)


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_cfg(path: Path | str) -> Any:
    """Read the pipeline config pickle with `RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config file {path} does not exist")
    try:
        return restricted_loads(path.read_bytes())
    except UnsafePickleError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot unpickle config: {exc}") from exc
