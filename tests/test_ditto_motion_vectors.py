"""Our motion pipeline against upstream's recorded cases (../shared/ditto/motion): every
case, stage by stage (each stage fed upstream's recorded inputs) and end to end, through
`verify_motion` (what `avatard ditto verify MOTION_DIR` runs), plus the command itself on
a copy of one case and on a broken copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

# The Ditto engine needs torch (the `ditto` extra); without it these tests skip.
pytest.importorskip("torch")

from ditto_shared import MOTION, needs_motion, resolved_futures  # noqa: E402

from avatard.engines.ditto.cli import ditto  # noqa: E402
from avatard.engines.ditto.verify_motion import (  # noqa: E402
    CFG_FILE,
    MotionVerifier,
    motion_cases,
)

pytestmark = needs_motion

CASES = [p.stem for p in motion_cases(MOTION)] if MOTION.is_dir() else ["no-cases"]
STAGES = ("sampler", "blinks", "conditions", "lmdm", "motion", "stitch", "end to end")


@pytest.fixture(scope="module")
def verifier() -> MotionVerifier:
    return MotionVerifier(MOTION)


@pytest.fixture(scope="module")
def results(verifier: MotionVerifier) -> dict[str, list]:
    """Every case checked once (the LMDM windows are most of the ~minutes on 2 cores)."""
    out: dict[str, list] = {}
    return out


def _case_results(verifier: MotionVerifier, results: dict[str, list], case: str) -> list:
    if case not in results:
        results[case] = verifier.check_case(MOTION / f"{case}.npz")
    return results[case]


def test_every_case_is_listed() -> None:
    names = set(CASES)
    assert {"offline_n050", "offline_n081", "offline_n150"} <= names
    assert {"online_n007", "online_n050", "online_n101"} <= names


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", CASES)
def test_stage_matches_upstream(verifier, results, case: str, stage: str) -> None:
    checks = [r for r in _case_results(verifier, results, case)
              if r.array == stage or r.array.startswith(f"{stage}:")]
    assert checks, f"{case}: no {stage} checks"
    failed = [r.line() for r in checks if not r.passed]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", CASES)
def test_end_to_end_covers_every_output(verifier, results, case: str) -> None:
    names = {r.array.split(": ", 1)[1] for r in _case_results(verifier, results, case)
             if r.array.startswith("end to end: ")}
    expected = {"n_frames", "window_start", "smooth_calls", "window_kp_cond", "motion",
                "motion_clipped", "d0", "x_s", "x_d_nostitch", "x_d"}
    expected |= ({"window_raw_first", "window_fed", "frame_fed", "window_after_end",
                  "frame_after_end"} if case.startswith("online")
                 else {"window_raw"})
    assert expected <= names, expected - names


def _folder(tmp_path: Path, case: str, change: dict[str, np.ndarray] | None = None) -> Path:
    folder = tmp_path / "motion"
    folder.mkdir()
    shutil.copy(MOTION / CFG_FILE, folder / CFG_FILE)
    shutil.copytree(MOTION / "manifest", folder / "manifest")
    with np.load(MOTION / f"{case}.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    data.update(change or {})
    np.savez(folder / f"{case}.npz", **data)
    return folder


def test_verify_command_on_a_motion_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "offline_n050")
    result = CliRunner().invoke(ditto, ["verify", str(folder)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("offline_n050")]
    for output in ("sampler: ddim_step_coef", "blinks: blink_idx", "lmdm: window_raw",
                   "motion: motion_clipped", "motion: d0", "stitch: x_d_nostitch",
                   "end to end: window_raw", "end to end: x_d "):
        assert any(output in line and line.endswith("ok") for line in lines), output
    assert "FAIL" not in result.output and "NOT CHECKED" not in result.output


def test_verify_command_fails_on_a_wrong_reference(tmp_path: Path) -> None:
    with np.load(MOTION / "offline_n050.npz") as npz:
        x_d, blinks = npz["x_d"], npz["blink_idx"]
    folder = _folder(tmp_path, "offline_n050",
                     {"x_d": x_d * 1.001, "blink_idx": np.roll(blinks, 1)})
    result = CliRunner().invoke(ditto, ["verify", str(folder)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if "FAIL" in line]
    assert any("stitch: x_d " in line for line in failed)
    assert any("end to end: x_d " in line for line in failed)
    assert any("blinks: blink_idx" in line for line in failed) or all(blinks == 0)


class _VectorEngine:
    """The engine surface a stream uses, around the synthetic LMDM and stitching network,
    returning upstream's recorded features and randomness so the stream's own plumbing
    (feature steps, windows, look-ahead, blinks, d0, frame count) is what is checked."""

    fps = 25
    max_batch = 4

    def __init__(self, verifier: MotionVerifier, data: dict[str, np.ndarray]):
        import torch

        from avatard.engines.ditto.pipeline import PipelineConfig

        self.verifier, self.data, self.torch = verifier, data, torch
        self.lmdm = verifier.lmdm
        self.cfg = verifier.cfg
        self.condition_dim = int(self.lmdm.model.cond_projection.in_features)
        self.pcfg: PipelineConfig = verifier.pipeline(data)
        self.windows = 0

    def pipeline(self, mode=None):
        return self.pcfg

    def preroll_features(self, rows: int) -> np.ndarray:
        return self.data["preroll_features"]

    def audio_features(self, pcm, start: int, end: int, base: int = 0) -> np.ndarray:
        return self.data["features"][start:end]

    def sample_window(self, reference, cond, x_init, step_noise, due=None,
                      holder=None) -> np.ndarray:
        assert step_noise.shape == self.data["ddim_step_noise"].shape
        k, self.windows = self.windows, self.windows + 1
        sample = self.verifier.sampler(self.pcfg.sampling_timesteps,
                                       self.data["window_x_init"][k : k + 1],
                                       self.data["ddim_step_noise"])
        return sample(reference, cond)

    def driving_keypoints(self, avatar, pcfg, motion, d0, blink_rows) -> np.ndarray:
        from avatard.engines.ditto import networks
        from avatard.engines.ditto.pipeline import driving_keypoints

        x_d = driving_keypoints(pcfg, avatar.stitch_source, motion, d0, blink_rows)
        return networks.stitch(self.verifier.stitch_net,
                               np.repeat(avatar.stitch_source.x_s, len(x_d), 0), x_d)

    def submit_frames(self, avatar, x_d, deadlines=None, first_alone=False):
        return resolved_futures(x_d)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("case", ["offline_n150", "online_n050", "online_n101"])
def test_engine_stream_reproduces_upstream(verifier, case: str) -> None:
    """A DittoStream fed the case's audio in uneven chunks gives upstream's x_d for every
    frame of the audio (online: upstream's frames past the audio are not output)."""
    import torch

    from avatard.engines.ditto.engine import SAMPLES_PER_FRAME, DittoAvatar, DittoStream
    from avatard.engines.ditto.generator import Blinks

    with np.load(MOTION / f"{case}.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    engine = _VectorEngine(verifier, data)
    info = verifier.source_info(data)
    avatar = DittoAvatar(np.zeros((8, 8, 3), np.uint8), (0, 0, 8), torch.zeros(1), info,
                         data["x_s"])
    mode = "online" if case.startswith("online") else "offline"
    stream = DittoStream(engine, avatar, seed=0, mode=mode)  # type: ignore[arg-type]
    stream.blinks = Blinks(engine.pcfg, None, rows=data["blink_idx"])
    n = len(data["features"])
    pcm = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
    frames = []
    for i in range(0, len(pcm), 2999):
        frames += stream.push(pcm[i : i + 2999])
    frames += stream.finish()
    assert len(frames) == n
    ours = np.stack(frames)
    ref = data["x_d"][:n]
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err
