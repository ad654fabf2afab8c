"""Every Ditto network, the keypoint maths and the image->frame chain against the
reference vectors (synthetic weights, float32 on CPU, relative L2 error <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

# The Ditto engine needs torch (the `ditto` extra); without it these tests skip.
torch = pytest.importorskip("torch")


from ditto_shared import MANIFESTS, VECTORS, needs_shared  # noqa: E402

from avatard.engines.ditto import networks, synthetic  # noqa: E402
from avatard.engines.ditto.keypoints import (  # noqa: E402
    bins_to_degrees,
    rotation_matrix,
    transform_keypoints,
)
from avatard.engines.ditto.lmdm import ddim_time_pairs  # noqa: E402
from avatard.engines.ditto.motion import MOTION_OUTPUTS  # noqa: E402
from avatard.engines.ditto.verify import relative_l2  # noqa: E402

TOL = 1e-4


pytestmark = needs_shared


def vectors(name: str) -> dict[str, np.ndarray]:
    with np.load(VECTORS / f"{name}.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def source() -> networks.SyntheticSource:
    return networks.SyntheticSource(MANIFESTS, VECTORS / synthetic.CONSTANTS_FILE)


@pytest.fixture(scope="module")
def model(source):
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = networks.synthetic_module(name, source)
        return cache[name]

    return get


@pytest.mark.parametrize("name", synthetic.MODULES)
def test_state_dict_matches_manifest(name: str) -> None:
    manifest = synthetic.load_manifest(MANIFESTS / f"{name}.json")
    module = networks.weight_target(networks.build_module(name, manifest.config))
    ours = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in module.state_dict().items()
    }
    theirs = {e.key: (e.shape, e.dtype) for e in manifest.entries}
    assert ours == theirs
    params = sum(p.numel() for p in module.parameters())
    assert params == manifest.params


def test_synthetic_scheme_rules() -> None:
    # Spot-check the recipe's leaf rules and determinism on small keys.
    w = synthetic.scheme_value("a.weight", (4, 3, 2), "float32")
    assert w.dtype == np.float32 and w.shape == (4, 3, 2)
    assert np.array_equal(w, synthetic.scheme_value("a.weight", (4, 3, 2), "float32"))
    assert not np.array_equal(w, synthetic.scheme_value("b.weight", (4, 3, 2), "float32"))
    var = synthetic.scheme_value("n.running_var", (64,), "float32")
    assert (var >= 1).all()
    gain = synthetic.scheme_value("n.weight", (256,), "float32")
    assert abs(float(gain.mean()) - 1) < 0.05
    assert synthetic.scheme_value("n.num_batches_tracked", (), "int64").shape == ()


def test_random_weights_are_seeded_and_never_the_reference() -> None:
    manifest = synthetic.load_manifest(MANIFESTS / "stitch_network.json")
    reference = synthetic.build_state_dict(manifest)
    first = synthetic.random_state_dict(manifest, seed=0)
    assert set(first) == set(reference)
    assert all(
        torch.equal(first[k], v) for k, v in synthetic.random_state_dict(manifest, 0).items()
    )
    assert not torch.equal(
        first["mlp.0.weight"], synthetic.random_state_dict(manifest, 1)["mlp.0.weight"]
    )
    # Even the reference seed value gives other weights in random mode.
    same_seed = synthetic.random_state_dict(manifest, seed=synthetic.SEED)
    assert not torch.equal(same_seed["mlp.0.weight"], reference["mlp.0.weight"])


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (64, 16, 1, 1)])
def test_spectral_uv_equal_full_svd(shape) -> None:
    # Our Gram-matrix shortcut must give the pair numpy's full SVD gives (WEIGHTS.md).
    weight = synthetic.scheme_value("x.weight_orig", shape, "float32")
    u, v = synthetic.spectral_uv(weight)
    matrix = weight.reshape(shape[0], -1).astype(np.float64)
    left, sigma, right_t = np.linalg.svd(matrix, full_matrices=False)
    sign = 1.0 if right_t[0][np.argmax(np.abs(right_t[0]))] > 0 else -1.0
    assert np.allclose(u, sign * left[:, 0], atol=1e-6)
    assert np.allclose(v, sign * right_t[0], atol=1e-6)
    assert u @ matrix @ v == pytest.approx(sigma[0], rel=1e-6)
    assert v[np.argmax(np.abs(v))] > 0


def test_appearance_extractor(model) -> None:
    data = vectors("appearance_extractor")
    out = networks.appearance_feature(model("appearance_extractor"), data["image"])
    assert relative_l2(out, data["feature_3d"]) < TOL


def test_motion_extractor(model) -> None:
    data = vectors("motion_extractor")
    out = networks.motion_info(model("motion_extractor"), data["image"])
    for key in MOTION_OUTPUTS:
        assert relative_l2(out[key], data[key]) < TOL, key


def test_transform_keypoint() -> None:
    data = vectors("transform_keypoint")
    src = {k[4:]: v for k, v in data.items() if k.startswith("src_")}
    drv = {**src, **{k[4:]: v for k, v in data.items() if k.startswith("drv_")}}
    assert relative_l2(transform_keypoints(src), data["x_s"]) < TOL
    assert relative_l2(transform_keypoints(drv), data["x_d"]) < TOL


def test_pose_maths_basics() -> None:
    # A one-hot bin at index i is i*3 - 97.5 degrees; zero angles give the identity.
    logits = np.full((1, 66), -1e4, dtype=np.float32)
    logits[0, 40] = 0
    assert bins_to_degrees(logits)[0] == pytest.approx(40 * 3 - 97.5)
    assert np.allclose(rotation_matrix(np.zeros(1), np.zeros(1), np.zeros(1)), np.eye(3))
    rot = rotation_matrix(np.array([10.0]), np.array([-20.0]), np.array([30.0]))[0]
    assert np.allclose(rot @ rot.T, np.eye(3))


def test_stitch_network(model) -> None:
    data = vectors("stitch_network")
    out = networks.stitch(model("stitch_network"), data["kp_source"], data["kp_driving"])
    assert relative_l2(out, data["out"]) < TOL


def test_warp_network(model) -> None:
    data = vectors("warp_network")
    out = networks.warp_feature(
        model("warp_network"), data["feature_3d"], data["kp_source"], data["kp_driving"]
    )
    assert relative_l2(networks.to_numpy(out), data["out"]) < TOL


def test_decoder(model) -> None:
    data = vectors("decoder")
    out = networks.decode(model("decoder"), data["feature"])
    assert out.shape == (1, 3, 512, 512)
    assert relative_l2(out, data["out"]) < TOL


@torch.inference_mode()
def test_lmdm_guided_step_and_ddim(model) -> None:
    data = vectors("lmdm")
    lmdm = model("lmdm")
    t = {k: torch.from_numpy(data[k]) for k in ("x", "cond_frame", "cond", "t")}
    pred_noise, x_start = lmdm.predict(
        t["x"], t["cond_frame"], t["cond"], t["t"], float(data["guidance_weight"])
    )
    assert relative_l2(pred_noise.numpy(), data["pred_noise"]) < TOL
    assert relative_l2(x_start.numpy(), data["x_start"]) < TOL

    steps = int(data["sampling_timesteps"])
    assert ddim_time_pairs(steps) == [tuple(r) for r in data["time_pairs"].tolist()]
    out = lmdm.ddim_sample(
        t["cond_frame"],
        t["cond"],
        steps,
        x_init=torch.from_numpy(data["ddim_x_init"]),
        noises=list(torch.from_numpy(data["ddim_noises"])),
    )
    assert relative_l2(out.numpy(), data["ddim_out"]) < TOL


def test_lmdm_rotary_buffers_match_upstream_constants() -> None:
    fresh = networks.build_module("lmdm").model.state_dict()
    for key, ref in vectors("lmdm_constant_buffers").items():
        assert np.array_equal(fresh[key].numpy(), ref), key


def test_chain_image_to_frame(model) -> None:
    """Source image -> appearance and motion -> keypoints -> warp -> decoder, compared
    with the decoder's reference frame (the vectors were chained the same way)."""
    image = vectors("appearance_extractor")["image"]
    drv = {k[4:]: v for k, v in vectors("transform_keypoint").items() if k.startswith("drv_")}
    feature_3d = networks.appearance_feature(model("appearance_extractor"), image)
    source = networks.motion_info(model("motion_extractor"), image)
    frame = networks.render_frame(
        model("warp_network"), model("decoder"), feature_3d, source, {**source, **drv}
    )
    assert relative_l2(frame, vectors("decoder")["out"]) < TOL
