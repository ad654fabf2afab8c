"""DittoEngine end to end with random weights (benchmark mode), and its checkpoint errors."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

# The Ditto engine needs torch (the `ditto` extra); without it these tests skip.
pytest.importorskip("torch")

from avatard.engines.base import EngineInputError  # noqa: E402
from avatard.engines.ditto.checkpoints import CFG_RELPATH, CheckpointError  # noqa: E402
from avatard.engines.ditto.engine import RANDOM_NOTE, DittoEngine  # noqa: E402
from avatard.engines.ditto.options import DittoOptions  # noqa: E402


def test_weights_option_is_required() -> None:
    with pytest.raises(EngineInputError, match="weights"):
        DittoEngine("cpu", {})


@pytest.mark.slow
def test_device_defaults_are_resolved_by_the_engine() -> None:
    # Typed options are accepted as they are. Unset batch sizes take the CPU's defaults,
    # set ones win, and the CUDA-only switches stay off on a CPU even when asked for.
    options = DittoOptions(weights="random", sampling_timesteps=2, max_windows=8,
                           cuda_graphs=True, compile=True, warmup=False)
    engine = DittoEngine("cpu", options)
    try:
        assert engine.options is options
        assert (engine.max_batch, engine.max_windows) == (4, 8)
        assert not engine.cuda_graphs and not engine.compiled
    finally:
        engine.close()


def test_checkpoint_folder_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"v0\.4_hubert_cfg_pytorch\.pkl does not exist"):
        DittoEngine("cpu", {"weights": str(tmp_path)})
    cfg_path = tmp_path / CFG_RELPATH
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_bytes(pickle.dumps({"base_cfg": {}}))
    with pytest.raises(CheckpointError, match="audio2motion_cfg"):
        DittoEngine("cpu", {"weights": str(tmp_path)})
    # The condition handler's flags (all on by default: 1024 + 79) must agree with the
    # LMDM's condition width; a cfg where they disagree is refused, naming both.
    cfg = {"audio2motion_cfg": {"motion_feat_dim": 265, "audio_feat_dim": 1059, "seq_frames": 80}}
    cfg_path.write_bytes(pickle.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"audio_feat_dim is 1059 .* = 1103"):
        DittoEngine("cpu", {"weights": str(tmp_path)})
    cfg["audio2motion_cfg"]["audio_feat_dim"] = 1103
    cfg_path.write_bytes(pickle.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"appearance_extractor\.pth does not exist"):
        DittoEngine("cpu", {"weights": str(tmp_path)})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_random_weights_render_one_frame(caplog: pytest.LogCaptureFixture) -> None:
    stages: list[tuple[str, float]] = []
    with caplog.at_level(logging.INFO, logger="avatard.engines.ditto"):
        engine = DittoEngine(
            "cpu",
            {"weights": "random", "seed": 3, "sampling_timesteps": 2},
            progress=lambda stage, frac: stages.append((stage, frac)),
        )
        report = engine.report()
        assert RANDOM_NOTE in report.notes
        assert stages[-1][1] == 1.0

        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        state = engine.register(image)
        assert engine.register(image) is state  # cached by content
        assert (state.width, state.height) == (128, 96)

        stream = engine.open_stream(state, seed=5)
        assert list(stream.push(np.zeros(640, np.float32))) == []  # a window needs 82 frames
        frames = list(stream.finish())
    assert len(frames) == 1
    assert frames[0].shape == (96, 128, 3) and frames[0].dtype == np.uint8
    # Outside the central square crop (x 16..112) the source shows through unchanged.
    assert np.array_equal(frames[0][:, :8], image[:, :8])
    assert not np.array_equal(frames[0][:, 40:90], image[:, 40:90])
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all(RANDOM_NOTE in m for m in messages)
    with pytest.raises(EngineInputError, match="image"):
        engine.register(np.zeros((10, 10), np.uint8))
    engine.close()


def test_auto_dtype_is_float16_on_cuda_and_float32_on_cpu() -> None:
    from avatard.engines.ditto.engine import resolve_dtype

    assert resolve_dtype("auto", cuda=True) == "float16"
    assert resolve_dtype("auto", cuda=False) == "float32"
    assert resolve_dtype("bfloat16", cuda=True) == "bfloat16"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_live_streams_run_online() -> None:
    engine = DittoEngine("cpu", {"weights": "random", "sampling_timesteps": 2, "warmup": False})
    try:
        image = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        state = engine.register(image)
        assert engine.mode == "offline" and not engine.open_stream(state, seed=1).live
        stream = engine.open_stream(state, seed=1, live=True)
        assert stream.live and stream.mode == "online" and stream.lookahead_frames == 21
        assert stream.burst_frames == 10  # a window every 10 frames, in line with HuBERT
        # 21 frames of audio: window 0 (the pre-roll's) has run, no frame is out yet.
        assert list(stream.push(np.zeros(21 * 640, np.float32))) == []
        assert stream.interrupt() == 21
        with pytest.raises(EngineInputError, match="mode"):
            engine.open_stream(state, seed=1, live=True, mode="offline")
    finally:
        engine.close()
