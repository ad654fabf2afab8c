"""Loading the official checkpoint layout, its error messages, and the restricted
unpickler for the pipeline config."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

# The Ditto engine needs torch (the `ditto` extra); without it these tests skip.
torch = pytest.importorskip("torch")

from ditto_shared import MANIFESTS  # noqa: E402

from avatard.engines.ditto import checkpoints, networks, synthetic  # noqa: E402
from avatard.engines.ditto.checkpoints import (  # noqa: E402
    CHECKPOINT_FILES,
    CheckpointError,
    UnsafePickleError,
    checkpoint_path,
    load_cfg,
    restricted_loads,
)

needs_manifests = pytest.mark.skipif(
    not MANIFESTS.is_dir(), reason=f"Ditto manifests not found at {MANIFESTS}"
)
# The small networks keep these tests fast; the big ones go through the same code.
SMALL = ("stitch_network", "appearance_extractor", "lmdm")


def save_official(root: Path, name: str, state: dict[str, torch.Tensor], ddp: bool = False):
    """Write `state` the way the official file for `name` holds it."""
    _, container_key, _ = CHECKPOINT_FILES[name]
    if ddp:
        state = {f"module.{k}": v for k, v in state.items()}
    obj = state if container_key is None else {container_key: state}
    path = checkpoint_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def synthetic_state(name: str) -> dict[str, torch.Tensor]:
    manifest = synthetic.load_manifest(MANIFESTS / f"{name}.json")
    # Constant buffers computed as the module does; the values are not what is tested.
    return synthetic.build_state_dict(manifest, constants=None)


@needs_manifests
@pytest.mark.parametrize("name", SMALL)
def test_official_layout_loads_strictly(tmp_path: Path, name: str) -> None:
    state = synthetic_state(name)
    save_official(tmp_path, name, state, ddp=(name == "stitch_network"))
    module = networks.checkpoint_module(name, tmp_path, "cpu", torch.float32)
    loaded = networks.weight_target(module).state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@needs_manifests
def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"decoder.*decoder\.pth.*does not exist"):
        networks.checkpoint_module("decoder", tmp_path, "cpu", torch.float32)


@needs_manifests
def test_wrong_key_is_named(tmp_path: Path) -> None:
    state = synthetic_state("stitch_network")
    state["mlp.9.weight"] = state.pop("mlp.6.weight")
    save_official(tmp_path, "stitch_network", state)
    with pytest.raises(CheckpointError) as err:
        networks.checkpoint_module("stitch_network", tmp_path, "cpu", torch.float32)
    message = str(err.value)
    assert "stitch_network.pth" in message
    assert "missing keys: mlp.6.weight" in message
    assert "unexpected keys: mlp.9.weight" in message


@needs_manifests
def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = synthetic_state("stitch_network")
    state["mlp.2.bias"] = torch.zeros(127)
    save_official(tmp_path, "stitch_network", state)
    with pytest.raises(
        CheckpointError, match=r"'mlp\.2\.bias' has shape \(127,\), expected \(128,\)"
    ):
        networks.checkpoint_module("stitch_network", tmp_path, "cpu", torch.float32)


@needs_manifests
def test_wrong_container_is_named(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, "lmdm")
    path.parent.mkdir(parents=True)
    torch.save(synthetic_state("lmdm"), path)  # bare state_dict instead of the container
    with pytest.raises(CheckpointError, match="model_state_dict"):
        networks.checkpoint_module("lmdm", tmp_path, "cpu", torch.float32)


def test_weights_only_refuses_code(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, "decoder")
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:
        pickle.dump({"x": _Exploit()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoints.read_state_dict(path, "decoder")


class _Exploit:
    """Pickles into a call of os.system; must never be executed."""

    def __init__(self, marker: Path | None = None):
        self.marker = marker

    def __reduce__(self):
        target = self.marker or Path("/nonexistent/ditto-pickle-marker")
        return (os.system, (f"touch {target}",))


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"cfg": _Exploit(marker)})
    with pytest.raises(UnsafePickleError, match=r"refused global (os|posix|nt)\.system"):
        restricted_loads(payload)
    assert not marker.exists()

    cfg_path = tmp_path / "ditto_cfg" / "v0.4_hubert_cfg_pytorch.pkl"
    cfg_path.parent.mkdir()
    cfg_path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="refused global"):
        load_cfg(cfg_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_unpickler_reads_plain_config(tmp_path: Path, protocol: int) -> None:
    cfg = {
        "base_cfg": {"model_path": "ditto_pytorch/models/lmdm_v0.4_hubert.pth", "device": "cuda"},
        "audio2motion_cfg": {"seq_frames": 80, "overlap": 10, "steps": [3, 5, 2], "x": 2.5},
        "flags": (True, False, None),
        "mean": np.linspace(0, 1, 7, dtype=np.float32),
        "grid": np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],
        "scalar": np.float64(0.125),
        "kind": np.dtype("float16"),
    }
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps(cfg, protocol=protocol))
    loaded = load_cfg(path)
    assert loaded["base_cfg"] == cfg["base_cfg"]
    assert loaded["audio2motion_cfg"] == cfg["audio2motion_cfg"]
    assert loaded["flags"] == cfg["flags"]
    assert np.array_equal(loaded["mean"], cfg["mean"]) and loaded["mean"].dtype == np.float32
    assert np.array_equal(loaded["grid"], cfg["grid"])
    assert loaded["scalar"] == 0.125 and loaded["kind"] == np.dtype("float16")


def test_restricted_unpickler_refuses_other_numpy_globals() -> None:
    # numpy.load would read files and unpickle again; it is not on the allow-list.
    class Loader:
        def __reduce__(self):
            return (np.load, ("/nonexistent.npy",))

    with pytest.raises(UnsafePickleError, match="numpy.*load"):
        restricted_loads(pickle.dumps(Loader()))
