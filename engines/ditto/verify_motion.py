"""Check our motion pipeline (audio features -> driving keypoints) against upstream's
recorded cases: a folder laid out like ``../shared/ditto/motion`` (``offline_*.npz``,
``online_*.npz``, ``ditto_motion_cfg.pkl``, ``manifest/`` with the LMDM and stitching
manifests and the LMDM's constant buffers).

Per case, stage by stage, each stage fed upstream's recorded inputs:
  sampler    DDIM time pairs (exact) and step factors (ours are float64: see
             STEP_COEF_TOLERANCE)
  blinks     the blink schedule from the recorded ``randint`` draws (exact)
  conditions each window's condition against the one the recorded rows give
  lmdm       each raw window from its recorded reference, condition, noise and step
             factors
  motion     fusing, smoothing, references, clipping, d0 and (online) output timing,
             fed the recorded raw windows
  stitch     x_s, x_d_nostitch, x_d fed the recorded clipped motion, d0 and blinks
then end to end (features, recorded noise and blink schedule -> every output).
Errors are relative L2 (`verify.relative_l2`); integer outputs must match exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoints, conditions, networks
from .generator import Blinks, FeatureMotion
from .lmdm import ddim_time_pairs
from .motion_gen import MOTION_DIM, MotionRecord, info_to_vector
from .pipeline import (
    PipelineConfig,
    StitchSource,
    blink_schedule,
    driving_keypoints,
)
from .synthetic import CONSTANTS_FILE
from .verify import CheckResult, relative_l2

CFG_FILE = "ditto_motion_cfg.pkl"
INFO_KEYS = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")
EXACT = "exact"
# Our DDIM step factors are float64 (lmdm.LMDM.step_coefficients), upstream's float32;
# they differ only in c at t = 999, where float32 rounding of a radicand near 1e-8 is up to
# about 2 ulp(1) = 2.4e-7, so c differs by at most sqrt(2.4e-7) = 4.9e-4. Each row
# (sqrt(abar_next), c, sigma) has norm 1, so the relative L2 of the table is below that.
STEP_COEF_TOLERANCE = 5e-4


def is_motion_folder(folder: Path | str) -> bool:
    folder = Path(folder)
    return (folder / CFG_FILE).is_file() and any(motion_cases(folder))


def motion_cases(folder: Path | str) -> list[Path]:
    folder = Path(folder)
    return sorted(p for pattern in ("offline_*.npz", "online_*.npz") for p in folder.glob(pattern))


class MotionVerifier:
    def __init__(self, folder: Path | str, device: str = "cpu", tolerance: float = 1e-5,
                 end_to_end_tolerance: float = 1e-4):
        self.folder = Path(folder)
        self.device = device
        self.tolerance = tolerance
        self.e2e_tolerance = end_to_end_tolerance
        self.cfg = checkpoints.load_cfg(self.folder / CFG_FILE)
        manifests = self.folder / "manifest"
        constants = manifests / CONSTANTS_FILE
        source = networks.SyntheticSource(manifests, constants if constants.is_file() else None)
        self.lmdm = networks.synthetic_module("lmdm", source, device)
        self.stitch_net = networks.synthetic_module("stitch_network", source, device)

    # ------------------------------------------------------------------ plumbing
    def run(self, progress: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
        results: list[CheckResult] = []
        cases = motion_cases(self.folder)
        if not cases:
            results.append(CheckResult(str(self.folder), "-", None, False, "no motion cases"))
        for path in cases:
            for result in self.check_case(path):
                results.append(result)
                if progress is not None:
                    progress(result)
        return results

    def check_case(self, path: Path) -> list[CheckResult]:
        name = path.stem
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except Exception as exc:
            return [CheckResult(name, "-", None, False, f"cannot read: {exc}")]
        out: list[CheckResult] = []
        for stage in (self._sampler, self._blinks, self._conditions, self._lmdm,
                      self._motion, self._stitch, self._end_to_end):
            start = time.perf_counter()
            label = stage.__name__.strip("_").replace("_", " ")
            try:
                for array, ours, ref, tol in stage(data):
                    out.append(self._result(name, f"{label}: {array}", ours, ref, tol,
                                            time.perf_counter() - start))
                    start = time.perf_counter()
            except KeyError as exc:
                out.append(CheckResult(name, label, None, False, f"missing array {exc}"))
            except Exception as exc:  # report and go on with the other stages
                out.append(CheckResult(name, label, None, False,
                                       f"{type(exc).__name__}: {exc}"))
        return out

    @staticmethod
    def _result(case: str, array: str, ours: Any, ref: Any, tol: float | str,
                seconds: float) -> CheckResult:
        ours_a, ref_a = np.asarray(ours), np.asarray(ref)
        if tol == EXACT:
            if ours_a.shape != ref_a.shape:
                return CheckResult(case, array, None, False,
                                   f"shape {ours_a.shape} != reference {ref_a.shape}", seconds)
            same = bool(np.array_equal(ours_a, ref_a))
            diff = float(np.abs(ours_a.astype(np.float64) - ref_a.astype(np.float64)).max()
                         ) if ours_a.size else 0.0
            return CheckResult(case, array, diff, same, "exact", seconds)
        try:
            err = relative_l2(ours_a, ref_a)
        except ValueError as exc:
            return CheckResult(case, array, None, False, str(exc), seconds)
        assert isinstance(tol, float)
        return CheckResult(case, array, err, err <= tol, "", seconds)

    # ------------------------------------------------------------------ case set-up
    def settings(self, data: dict[str, np.ndarray]) -> dict[str, Any]:
        return json.loads(str(data["settings_json"]))

    def pipeline(self, data: dict[str, np.ndarray]) -> PipelineConfig:
        s = self.settings(data)
        return PipelineConfig.from_cfg(self.cfg, s["mode"], self.lmdm.seq_frames,
                                       overrides=s.get("setup_kwargs") or {})

    @staticmethod
    def source_info(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: data[f"src_{k}"] for k in INFO_KEYS}

    def cond_source(self, pcfg: PipelineConfig, data) -> conditions.ConditionSource:
        if pcfg.template is not None:
            return pcfg.template.condition_source()
        info = self.source_info(data)
        return conditions.ConditionSource(sc=info["kp"].reshape(-1),
                                          eye_open=data["src_eye_open"],
                                          eye_ball=data["src_eye_ball"])

    def template_vector(self, pcfg: PipelineConfig, data) -> np.ndarray:
        if pcfg.template is not None:
            return pcfg.template.vector
        return info_to_vector(self.source_info(data))

    def reference_conditions(self, pcfg: PipelineConfig, data) -> np.ndarray:
        """(W,80,C) the conditions upstream's recorded rows describe."""
        feats = data["features"]
        pre = data.get("preroll_features")
        rows = data["window_audio_rows"].astype(np.int64)
        emo_rows = data["window_emo_rows"].astype(np.int64)
        emo = conditions.parse_emotion(pcfg.emo)
        source = self.cond_source(pcfg, data)
        out = []
        for k in range(len(rows)):
            audio = np.stack([feats[r] if r >= 0 else pre[r + len(pre)] for r in rows[k]])
            controls = conditions.control_dims(self.cfg, source, len(audio), 0,
                                               emo=pcfg.emo, eye_f0_mode=pcfg.eye_f0_mode)
            flags = conditions.handler_flags(self.cfg)
            if flags["use_emo"]:
                controls[:, :8] = emo[emo_rows[k] % len(emo)]
            out.append(np.concatenate([audio, controls], axis=1))
        return np.stack(out).astype(np.float32)

    def sampler(self, steps: int, x_init: np.ndarray, step_noise: np.ndarray,
                log: list | None = None, step_coef: np.ndarray | None = None
                ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """An LMDM sampler that starts window k from x_init[k] and adds the recorded
        per-step noise (the same for every window), as upstream's run did; with
        `step_coef` (upstream's recorded (S-1,3) step factors) instead of ours."""
        calls = iter(range(len(x_init)))
        dev = self.device
        noises = [torch.from_numpy(n[None]).to(dev) for n in step_noise]

        @torch.inference_mode()
        def sample(reference: np.ndarray, cond: np.ndarray) -> np.ndarray:
            k = next(calls)
            out = self.lmdm.ddim_sample(
                torch.from_numpy(np.asarray(reference, np.float32).reshape(1, -1)).to(dev),
                torch.from_numpy(np.asarray(cond, np.float32)[None]).to(dev),
                steps, x_init=torch.from_numpy(x_init[k][None]).to(dev), noises=noises,
                step_coef=step_coef)
            if log is not None:
                log.append(k)
            return networks.to_numpy(out)[0]

        return sample

    def _run_pipeline(self, pcfg: PipelineConfig, data, sample, record: MotionRecord
                      ) -> tuple[FeatureMotion, np.ndarray]:
        motion = FeatureMotion(pcfg, self.cfg, self.cond_source(pcfg, data),
                               self.template_vector(pcfg, data), sample,
                               preroll=data.get("preroll_features"), record=record)
        feats = data["features"]
        frames = []
        position = 0
        for size in data["feed_chunks"].astype(np.int64):
            chunk = feats[position : position + size]
            position += size
            frames.append(motion.push(chunk))
        frames.append(motion.finish(None if pcfg.motion.online else len(feats)))
        return motion, np.concatenate(frames)

    # ------------------------------------------------------------------ stages
    def _sampler(self, data) -> Iterator[tuple]:
        steps = int(self.settings(data)["sampling_timesteps"])
        pairs = ddim_time_pairs(steps, self.lmdm.n_timestep)
        yield "ddim_time_pairs", np.array(pairs, np.int64), data["ddim_time_pairs"], EXACT
        eps = np.array([[float(self.lmdm.sqrt_recip1m_alphas_cumprod[t]),
                         float(self.lmdm.sqrt_recipm1_alphas_cumprod[t])] for t, _ in pairs],
                       np.float32)
        yield "ddim_eps_coef", eps, data["ddim_eps_coef"], self.tolerance
        coef = np.array([[float(v) for v in self.lmdm.step_coefficients(t, tn)]
                         for t, tn in pairs if tn >= 0], np.float32).reshape(-1, 3)
        yield "ddim_step_coef", coef, data["ddim_step_coef"], max(self.tolerance,
                                                                  STEP_COEF_TOLERANCE)

    def _blinks(self, data) -> Iterator[tuple]:
        pcfg = self.pipeline(data)
        draws = iter(int(v) for v in data["blink_draws"])
        ref = data["blink_idx"]
        assert pcfg.delta_eye_arr is not None
        ours = blink_schedule(len(ref), len(pcfg.delta_eye_arr), pcfg.delta_eye_open_n,
                              lambda lo, hi: next(draws))
        yield "blink_idx", ours.astype(ref.dtype), ref, EXACT
        # The engine's own path: the offline lazy schedule of a clip of unknown length.
        settings = self.settings(data)
        if settings["mode"] == "offline":
            draws = iter(int(v) for v in data["blink_draws"])
            lazy = Blinks(pcfg, lambda lo, hi: next(draws))
            n = len(ref)
            rows = lazy.rows(0, n, total=n)
            assert rows is not None
            yield "blink_idx (streamed)", rows.astype(ref.dtype), ref, EXACT

    def _conditions(self, data) -> Iterator[tuple]:
        pcfg = self.pipeline(data)
        record = MotionRecord(keep_cond=True)
        raw = self._recorded_raw(data)
        self._run_pipeline(pcfg, data, lambda r, c: raw[len(record.window_cond)], record)
        yield "window_start", np.array(record.window_start, np.int32), data["window_start"], EXACT
        yield ("window_cond", np.stack(record.window_cond),
               self.reference_conditions(pcfg, data), self.tolerance)

    def _recorded_raw(self, data) -> np.ndarray:
        if "window_raw" in data:
            return data["window_raw"]
        first, tail = data["window_raw_first"], data["window_raw_tail"]
        raw = np.zeros((1 + len(tail), first.shape[0], MOTION_DIM), np.float32)
        raw[0] = first
        raw[1:, first.shape[0] - tail.shape[1] :] = tail  # only frames 60..79 are read
        return raw

    def _lmdm(self, data) -> Iterator[tuple]:
        pcfg = self.pipeline(data)
        conds = self.reference_conditions(pcfg, data)
        # The sampler by itself: upstream's own step factors, so that only the network and
        # the update arithmetic are compared (end to end uses ours).
        sample = self.sampler(pcfg.sampling_timesteps, data["window_x_init"],
                              data["ddim_step_noise"], step_coef=data["ddim_step_coef"])
        raw = np.stack([sample(data["window_kp_cond"][k], conds[k]) for k in range(len(conds))])
        yield from self._raw_outputs(raw, data)

    def _raw_outputs(self, raw: np.ndarray, data) -> Iterator[tuple]:
        if "window_raw" in data:
            yield "window_raw", raw, data["window_raw"], self.tolerance
        else:
            tail = data["window_raw_tail"]
            yield "window_raw_first", raw[0], data["window_raw_first"], self.tolerance
            if len(tail):
                yield ("window_raw_tail", raw[1:, raw.shape[1] - tail.shape[1] :], tail,
                       self.tolerance)

    def _motion_outputs(self, pcfg, data, motion: FeatureMotion, frames: np.ndarray,
                        record: MotionRecord, tol: float) -> Iterator[tuple]:
        yield "n_frames", np.int32(len(frames)), data["n_frames"], EXACT
        yield "window_start", np.array(record.window_start, np.int32), data["window_start"], EXACT
        yield ("smooth_calls", np.array(record.smooth_calls, np.int32).reshape(-1, 3),
               data["smooth_calls"], EXACT)
        if pcfg.motion.online:
            for name in ("window_fed", "frame_fed"):
                yield name, np.array(getattr(record, name), np.int32), data[name], EXACT
            for name in ("window_after_end", "frame_after_end"):
                yield name, np.array(getattr(record, name), bool), data[name], EXACT
        yield ("window_kp_cond", np.stack(record.window_kp_cond), data["window_kp_cond"],
               self.tolerance)
        unclipped = np.concatenate(record.motion) if record.motion else frames
        yield "motion", unclipped, data["motion"], tol
        yield "motion_clipped", frames, data["motion_clipped"], tol
        yield "d0", motion.d0, data["d0"], tol

    def _motion(self, data) -> Iterator[tuple]:
        pcfg = self.pipeline(data)
        raw = self._recorded_raw(data)
        record = MotionRecord()
        motion, frames = self._run_pipeline(pcfg, data,
                                            lambda r, c: raw[len(record.window_start)], record)
        yield from self._motion_outputs(pcfg, data, motion, frames, record, self.tolerance)

    def _stitch_outputs(self, pcfg, data, clipped, d0, tol) -> Iterator[tuple]:
        source = StitchSource.from_info(self.source_info(data))
        blinks = data["blink_idx"].astype(np.int64)
        rows = blinks[np.arange(len(clipped)) % len(blinks)]
        x_d0 = driving_keypoints(pcfg, source, clipped, d0, rows)
        x_d = x_d0
        if pcfg.flag_stitching and len(x_d0):
            x_d = networks.stitch(self.stitch_net, np.repeat(source.x_s, len(x_d0), 0), x_d0)
        yield "x_s", source.x_s, data["x_s"], self.tolerance
        yield "x_d_nostitch", x_d0, data["x_d_nostitch"], tol
        yield "x_d", x_d, data["x_d"], tol

    def _stitch(self, data) -> Iterator[tuple]:
        pcfg = self.pipeline(data)
        yield from self._stitch_outputs(pcfg, data, data["motion_clipped"], data["d0"],
                                        self.tolerance)

    def _end_to_end(self, data) -> Iterator[tuple]:
        pcfg = self.pipeline(data)
        record = MotionRecord()
        sample = self.sampler(pcfg.sampling_timesteps, data["window_x_init"],
                              data["ddim_step_noise"])
        motion, frames = self._run_pipeline(pcfg, data, sample, record)
        raw = np.stack(record.window_raw) if record.window_raw else np.zeros((0, 80, MOTION_DIM))
        yield from self._raw_outputs(raw, data)
        yield from self._motion_outputs(pcfg, data, motion, frames, record, self.tolerance)
        yield from self._stitch_outputs(pcfg, data, frames, motion.d0, self.e2e_tolerance)


def verify_motion(folder: Path | str, device: str = "cpu", tolerance: float = 1e-5,
                  end_to_end_tolerance: float = 1e-4,
                  progress: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Every case and stage of a motion folder; see the module docstring."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return MotionVerifier(folder, device, tolerance, end_to_end_tolerance).run(progress)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
