"""Deterministic synthetic state_dicts for the Ditto networks.

The reference vectors were produced by the upstream modules filled with weights made by a
fixed recipe (see WEIGHTS.md in the shared reference folder). This module rebuilds exactly
those weights from a manifest so our modules can be compared with the references:

- ``scheme``: a per-key numpy generator seeded with ``[20261123, crc32(key)]`` draws a
  standard normal array that is shaped into a plausible value by the key's leaf name.
- ``spectral_uv``: leading singular vectors of the matching ``weight_orig``.
- ``constant``: a buffer the module computes itself (rotary frequencies), read from
  ``lmdm_constant_buffers.npz``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 20261123
MODULES = (
    "appearance_extractor",
    "motion_extractor",
    "warp_network",
    "decoder",
    "stitch_network",
    "lmdm",
)
CONSTANTS_FILE = "lmdm_constant_buffers.npz"

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    shape: tuple[int, ...]
    dtype: str
    synthetic: str


@dataclass(frozen=True)
class Manifest:
    module: str
    checkpoint_file: str
    container: str
    params: int
    entries: tuple[ManifestEntry, ...]
    config: dict[str, Any]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {e.key: e.shape for e in self.entries}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"manifest dtype {name!r} is not supported") from None


def load_manifest(path: Path | str) -> Manifest:
    """Read one `manifest/<module>.json`."""
    raw = json.loads(Path(path).read_text())
    entries = tuple(
        ManifestEntry(
            key=e["key"],
            shape=tuple(int(s) for s in e["shape"]),
            dtype=e["dtype"],
            synthetic=e.get("synthetic", "scheme"),
        )
        for e in raw["state_dict"]
    )
    return Manifest(
        module=raw["module"],
        checkpoint_file=raw["checkpoint_file"],
        container=raw["container"],
        params=int(raw.get("params", 0)),
        entries=entries,
        config=dict(raw.get("config", {})),
    )


def load_manifests(manifest_dir: Path | str) -> dict[str, Manifest]:
    """All six manifests of a folder, by module name."""
    manifest_dir = Path(manifest_dir)
    out = {}
    for name in MODULES:
        path = manifest_dir / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"manifest {path} is missing")
        out[name] = load_manifest(path)
    return out


def scheme_value(key: str, shape: tuple[int, ...], dtype: str, seed: int = SEED) -> np.ndarray:
    """The synthetic value of one state_dict entry made by the documented scheme.

    `seed` other than the reference seed gives the random benchmark weights: same
    magnitudes (so the networks run without overflow), different values."""
    if dtype.startswith("int") or dtype == "bool":
        # Integer entries (num_batches_tracked) are zeros and consume no draw.
        return np.zeros(shape, dtype=np.int64 if dtype == "int64" else np.int32)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    n = rng.standard_normal(shape)  # float64; the cast to float32 happens last
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_mean":
        value = 0.1 * n
    elif leaf == "running_var":
        value = 1.0 + 0.1 * np.abs(n)
    elif len(shape) >= 2:
        value = n / math.sqrt(math.prod(shape[1:]))
    elif leaf == "weight":
        value = 1.0 + 0.1 * n
    else:
        value = 0.02 * n
    return value.astype(np.float32)


def spectral_uv(weight_orig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leading left/right singular vectors of `weight_orig` viewed as (out, -1).

    Float64 throughout; the pair's sign is fixed so that the largest-magnitude entry of
    v is positive (a singular pair is only defined up to a joint sign flip). The SVD runs
    on the small Gram matrix (e.g. 512x512 instead of 512x4608): the leading pair is the
    same to ~1e-14 and it is ~6x faster, which matters for 16 decoder convolutions on CI.
    """
    matrix = weight_orig.astype(np.float64).reshape(weight_orig.shape[0], -1)
    if matrix.shape[0] <= matrix.shape[1]:
        left, sq_sigma, _ = np.linalg.svd(matrix @ matrix.T)
        u = left[:, 0]
        v = matrix.T @ u / np.sqrt(sq_sigma[0])
    else:
        right, sq_sigma, _ = np.linalg.svd(matrix.T @ matrix)
        v = right[:, 0]
        u = matrix @ v / np.sqrt(sq_sigma[0])
    if v[np.argmax(np.abs(v))] < 0:
        u, v = -u, -v
    return u.astype(np.float32), v.astype(np.float32)


def rotary_freqs(count: int, theta: float = 10000.0) -> np.ndarray:
    """Rotary-embedding frequencies for a model width of 2*count, as the module builds them."""
    dim = 2 * count
    exponents = torch.arange(0, dim, 2).float() / dim
    return (1.0 / (theta**exponents)).numpy()


def build_state_dict(
    manifest: Manifest,
    constants: Mapping[str, np.ndarray] | None = None,
    seed: int = SEED,
) -> dict[str, torch.Tensor]:
    """The synthetic state_dict of one network, in manifest order.

    With `constants=None` the rotary buffers are computed as the module does at build time
    (used for random benchmark weights); verification passes the shared constants file.
    """
    values: dict[str, np.ndarray] = {}
    for entry in manifest.entries:
        if entry.synthetic in ("scheme", "spectral_uv"):
            # spectral u/v depend on weight_orig: filled in the second pass below.
            if entry.synthetic == "scheme":
                values[entry.key] = scheme_value(entry.key, entry.shape, entry.dtype, seed)
        elif entry.synthetic == "constant" and constants is None:
            if not entry.key.endswith("freqs") or len(entry.shape) != 1:
                raise ValueError(f"{entry.key}: no rule to compute this constant buffer")
            values[entry.key] = rotary_freqs(entry.shape[0])
        elif entry.synthetic == "constant":
            if entry.key not in constants:
                raise KeyError(
                    f"{manifest.module}: constant buffer {entry.key!r} is not in the "
                    f"constants file ({CONSTANTS_FILE})"
                )
            values[entry.key] = np.asarray(constants[entry.key], dtype=np.float32)
        else:
            raise ValueError(f"{manifest.module}: unknown synthetic kind {entry.synthetic!r}")
    for entry in manifest.entries:
        if entry.synthetic != "spectral_uv":
            continue
        prefix, _, leaf = entry.key.rpartition(".")
        if leaf not in ("weight_u", "weight_v"):
            raise ValueError(f"{entry.key}: spectral_uv applies to weight_u/weight_v only")
        orig_key = f"{prefix}.weight_orig"
        u_key, v_key = f"{prefix}.weight_u", f"{prefix}.weight_v"
        if u_key not in values:
            u, v = spectral_uv(values[orig_key])
            values[u_key], values[v_key] = u, v
    state = {}
    for entry in manifest.entries:
        value = values[entry.key]
        if tuple(value.shape) != entry.shape:
            raise ValueError(f"{entry.key}: built shape {value.shape} != manifest {entry.shape}")
        state[entry.key] = torch.from_numpy(np.array(value, copy=True, order="C")).to(
            torch_dtype(entry.dtype)
        )
    return state


def load_constants(path: Path | str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def find_constants(manifest_dir: Path | str, vectors_dir: Path | str | None = None) -> Path:
    """`lmdm_constant_buffers.npz`: in the vectors folder, else `<manifests>/../vectors`."""
    candidates = []
    if vectors_dir is not None:
        candidates.append(Path(vectors_dir) / CONSTANTS_FILE)
    candidates.append(Path(manifest_dir).parent / "vectors" / CONSTANTS_FILE)
    candidates.append(Path(manifest_dir) / CONSTANTS_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{CONSTANTS_FILE} not found in any of: " + ", ".join(str(p) for p in candidates)
    )


def random_state_dict(manifest: Manifest, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the manifest's shapes, for benchmarking only.

    The generator seed is offset by 2**32 so no user seed can reproduce the reference
    weights (the reference seed is below 2**32)."""
    return build_state_dict(manifest, constants=None, seed=2**32 + int(seed))
