"""The checkpoint path (``weights=<folder>``) end to end, on a locally built folder.

The folder has the official layout: the six networks written by
``avatard.engines.ditto.random_checkpoint`` (seeded RANDOM weights of the official
shapes, official containers) with its cfg, and stand-in aux ONNX models from
``ditto_fake_aux`` (a planted face; a HuBERT stand-in whose features depend on the audio).
mediapipe's face_landmarker.task has no stand-in and needs none: the cfg has the released
structure, whose template ``ch_info`` supplies the eye conditions (condition width 1103),
so the engine registers without eye features. The output is noise; what is checked is that the
whole path loads, registers, conditions, samples and composites frames of the right size,
and that a broken folder is refused with an error naming the file.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from ditto_fake_aux import face_image, write_fake_aux  # noqa: E402

from avatard.engines.ditto import checkpoints, conditions, registration  # noqa: E402
from avatard.engines.ditto.checkpoints import CFG_RELPATH, CheckpointError  # noqa: E402
from avatard.engines.ditto.random_checkpoint import (  # noqa: E402
    MARKER_FILE,
    container,
    make_cfg,
    write_random_checkpoint,
)

IMAGE_HW = (480, 640)  # the planted face lies inside this image
SEED = 7


# --------------------------------------------------------------------------- cfg (fast)


def test_cfg_matches_the_condition_handler_and_loader():
    cfg = checkpoints.restricted_loads(pickle.dumps(make_cfg(), protocol=4))
    a2m = cfg["audio2motion_cfg"]
    assert conditions.handler_flags(cfg) == {
        "use_emo": True, "use_eye_open": True, "use_eye_ball": True, "use_sc": True}
    assert conditions.check_width(cfg) == a2m["audio_feat_dim"] == 1024 + 8 + 2 + 6 + 63
    kwargs = conditions.default_kwargs(cfg)
    assert kwargs["delta_eye_arr"].shape == (15, 63)
    assert kwargs["v_min_max_for_clip"].shape == (4, 265)
    assert kwargs["ch_info"]["sc"].shape == (63,)
    assert (kwargs["fix_kp_cond"], kwargs["fix_kp_cond_dim"]) == (1, [0, 202])
    assert kwargs["overall_ctrl_info"] == {"delta_pitch": 2}
    assert (a2m["motion_feat_dim"], a2m["seq_frames"]) == (265, 80)
    v_min, v_max = conditions.clip_limits(cfg)
    assert v_min.shape == v_max.shape == (265,) and np.all(v_min < v_max)
    assert conditions.default_kwargs(cfg)["emo"] == 4
    # Upstream's relative paths resolve to the official files under ditto_pytorch/.
    root = Path("/ckpt")
    paths = registration.aux_paths(root, cfg)
    for key, name in registration.AUX_FILES.items():
        assert paths[key] == root / checkpoints.AUX_RELDIR / name
    base = cfg["base_cfg"]
    for module, (filename, _, _) in checkpoints.CHECKPOINT_FILES.items():
        section = a2m if module == "lmdm" else base[f"{module}_cfg"]
        assert section["model_path"] == f"models/{filename}"
    assert base["hubert_cfg"]["model_path"] == "aux_models/hubert_streaming_fix_kv.onnx"
    plain = make_cfg(template=False)
    assert "ch_info" not in plain["default_kwargs"]
    assert conditions.check_width(plain) == plain["audio2motion_cfg"]["audio_feat_dim"] == 1095


def test_containers_read_back(tmp_path):
    state = {"mlp.0.weight": torch.ones(2, 3)}
    for module in checkpoints.CHECKPOINT_FILES:
        path = tmp_path / f"{module}.pth"
        torch.save(container(module, state), path)
        back = checkpoints.read_state_dict(path, module)
        assert list(back) == ["mlp.0.weight"] and torch.equal(back["mlp.0.weight"], state[
            "mlp.0.weight"])
    assert list(container("stitch_network", state)["retarget_shoulder"]) == ["module.mlp.0.weight"]
    assert list(container("lmdm", state)) == ["model_state_dict"]


# --------------------------------------------------------------------------- folder (slow)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("ditto_checkpoint")
    write_random_checkpoint(root, seed=SEED, log=lambda message: None)
    planted = write_fake_aux(root / checkpoints.AUX_RELDIR, IMAGE_HW)
    yield root, planted
    shutil.rmtree(root, ignore_errors=True)  # ~680 MB: not left for pytest's kept tmp dirs


def variant(root: Path, dest: Path, replace: dict[str, object] | None = None) -> Path:
    """A copy of the folder made of symlinks, with the files named in `replace` (relative
    paths) left out (value None) or replaced (a torch object saved, or bytes written)."""
    replace = replace or {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel not in replace:
            target.symlink_to(path)
        elif isinstance(replace[rel], bytes):
            target.write_bytes(replace[rel])
        elif replace[rel] is not None:
            torch.save(replace[rel], target)
    return dest


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_engine_renders_from_checkpoint_folder(folder):
    from avatard.engines.ditto.engine import DittoEngine

    root, planted = folder
    assert (root / MARKER_FILE).is_file()
    for module in checkpoints.CHECKPOINT_FILES:
        assert checkpoints.checkpoint_path(root, module).is_file()
    assert not (root / checkpoints.AUX_RELDIR / "face_landmarker.task").exists()

    engine = DittoEngine("cpu", {"weights": str(root), "sampling_timesteps": 2,
                                 "warmup": False})
    try:
        assert engine.lmdm.model.cond_projection.in_features == 1103  # from the cfg
        assert "RANDOM WEIGHTS" in engine.report().notes  # the folder's marker file

        # HuBERT stand-in: (frames, 1024) features that follow the audio.
        rng = np.random.default_rng(0)
        pcm = (0.3 * rng.standard_normal(3200)).astype(np.float32)  # 0.2 s: 5 frames
        other = (0.3 * rng.standard_normal(3200)).astype(np.float32)
        feats = engine.audio_features(pcm, 0, 5)
        assert feats.shape == (5, 1024) and feats.dtype == np.float32
        assert np.abs(feats - engine.audio_features(other, 0, 5)).max() > 0.1

        image = face_image(planted)
        assert image.shape == (*IMAGE_HW, 3)
        state = engine.register(image)
        assert (state.height, state.width) == IMAGE_HW

        stream = engine.open_stream(state, seed=3)
        frames = list(stream.push(pcm[:1000])) + list(stream.push(pcm[1000:]))
        frames += list(stream.finish())
    finally:
        engine.close()
    assert len(frames) == 5
    for frame in frames:
        assert frame.shape == (*IMAGE_HW, 3) and frame.dtype == np.uint8
    # Frames are the registered image with the face pasted through the landmark crop:
    # pixels whose crop position is outside the 512 crop are the image's, the face
    # region is not.
    reg = registration.Registrar(root / checkpoints.AUX_RELDIR, "cpu", eyes=False)
    m_o2c = reg.register(image).m_o2c
    ys, xs = np.mgrid[: IMAGE_HW[0], : IMAGE_HW[1]]
    u = m_o2c[0, 0] * xs + m_o2c[0, 1] * ys + m_o2c[0, 2]
    v = m_o2c[1, 0] * xs + m_o2c[1, 1] * ys + m_o2c[1, 2]
    outside = (u <= 0) | (v <= 0) | (u >= 511) | (v >= 511)
    assert outside.any()
    x1, y1, x2, y2 = (int(round(c)) for c in planted["box"])
    for frame in frames:
        assert np.array_equal(frame[outside], image[outside])
        assert not np.array_equal(frame[y1:y2, x1:x2], image[y1:y2, x1:x2])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_loader_rejects_a_corrupted_folder(folder, tmp_path):
    from avatard.engines.ditto.engine import DittoEngine

    root, _ = folder
    options = {"sampling_timesteps": 2, "warmup": False}
    models = checkpoints.MODELS_RELDIR

    missing = variant(root, tmp_path / "missing", {f"{models}/warp_network.pth": None})
    with pytest.raises(CheckpointError, match=r"warp_network\.pth does not exist"):
        DittoEngine("cpu", {"weights": str(missing), **options})

    stitch = checkpoints.read_state_dict(checkpoints.checkpoint_path(root, "stitch_network"),
                                         "stitch_network")
    stitch["mlp.0.weight"] = torch.zeros(7, 5)
    bad = variant(root, tmp_path / "shape",
                  {f"{models}/stitch_network.pth": container("stitch_network", stitch)})
    with pytest.raises(CheckpointError,
                       match=r"stitch_network\.pth.*'mlp\.0\.weight' has shape \(7, 5\)"):
        DittoEngine("cpu", {"weights": str(bad), **options})

    # A cfg that disagrees with the LMDM file (no template, eye conditions off: 1095).
    cfg = pickle.dumps(make_cfg(template=False), protocol=4)
    mismatch = variant(root, tmp_path / "cfg", {CFG_RELPATH: cfg})
    with pytest.raises(CheckpointError,
                       match=r"lmdm_v0\.4_hubert\.pth.*cond_projection\.weight"):
        DittoEngine("cpu", {"weights": str(mismatch), **options})


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_serve_with_checkpoints_through_the_daemon(folder, tmp_path):
    """`avatard serve --engine ditto --checkpoints DIR`: a real daemon and worker load the
    folder, register a portrait sent by a client and stream a lipsync job's frames."""
    import io

    from daemon_harness import run_daemon
    from PIL import Image

    from avatard.ipc.client import DoneEvent, FrameEvent

    root, planted = folder
    buffer = io.BytesIO()
    Image.fromarray(face_image(planted)).save(buffer, format="PNG")
    slow = {"load_s": 900.0, "warmup_s": 900.0, "stall_timeout_s": 900.0,
            "heartbeat_timeout_s": 60.0, "client_call_s": 900.0}
    with run_daemon(tmp_path, engines={"avatar": "ditto", "tts": "fake", "asr": "fake"},
                    engine_options={"ditto": {"sampling_timesteps": 2, "warmup": False}},
                    extra_args=["--checkpoints", str(root)], timeouts=slow,
                    ready_timeout_s=900,
                    # Ditto pastes back into the portrait: frames are its size, here
                    # larger than the default 512 x 512 slots.
                    sections={"rings": {"frame_slot_bytes": IMAGE_HW[0] * IMAGE_HW[1] * 3}}
                    ) as d:
        worker = d.status()["workers"][0]
        assert "RANDOM WEIGHTS" in str(worker["engines"])  # the folder's marker file
        with d.client(timeout_s=900) as client:
            avatar = client.register_avatar(buffer.getvalue())
            pcm = (0.3 * np.random.default_rng(1).standard_normal(1920)).astype(np.float32)
            events = list(client.lipsync(pcm, 16000, avatar=avatar, seed=3))
    frames = [e for e in events if isinstance(e, FrameEvent)]
    assert [f.index for f in frames] == [0, 1, 2]  # 0.12 s at 25 fps
    assert all(f.array.shape == (*IMAGE_HW, 3) and f.array.dtype == np.uint8 for f in frames)
    assert isinstance(events[-1], DoneEvent)
