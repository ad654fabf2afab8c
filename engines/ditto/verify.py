"""Check our Ditto networks against the reference vectors.

Rebuilds the synthetic weights from the manifests, runs every network on the inputs saved
in each vectors file and reports the relative L2 error ``||ours - ref|| / ||ref||`` of
every output array. A chain check also runs the per-frame pipeline from the source image
to the 512x512 frame through the same functions the engine uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import networks
from .keypoints import transform_keypoints
from .lmdm import ddim_time_pairs
from .motion import MOTION_OUTPUTS
from .serving import rewrite_for_serving
from .synthetic import CONSTANTS_FILE, find_constants

CHAIN = "chain (image -> frame)"


@dataclass(frozen=True)
class CheckResult:
    file: str
    array: str
    error: float | None  # relative L2 error; None when nothing could be compared
    passed: bool
    note: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        err = f"{self.error:.3e}" if self.error is not None else "-"
        status = "ok" if self.passed else ("FAIL" if self.error is not None else "NOT CHECKED")
        note = f"  {self.note}" if self.note else ""
        kind = "max_abs" if self.note == "exact" else "rel_l2"
        note = "" if self.note == "exact" else note
        return f"{self.file:<26} {self.array:<14} {kind}={err:<10} {status}{note}"


def relative_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    ours64 = np.asarray(ours, dtype=np.float64)
    ref64 = np.asarray(ref, dtype=np.float64)
    if ours64.shape != ref64.shape:
        raise ValueError(f"shape {ours64.shape} != reference {ref64.shape}")
    denom = np.linalg.norm(ref64)
    diff = np.linalg.norm(ours64 - ref64)
    if not np.isfinite(diff):
        return float("inf")
    return float(diff / denom) if denom > 0 else float(diff)


class VectorSetError(KeyError):
    """A vectors file lacks an array we need."""


class Verifier:
    """Runs each vectors file through our modules (synthetic weights, built lazily)."""

    def __init__(
        self,
        vectors_dir: Path | str,
        manifest_dir: Path | str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        tolerance: float = 1e-4,
        serving: bool = False,
    ):
        self.vectors_dir = Path(vectors_dir)
        self.manifest_dir = (
            Path(manifest_dir) if manifest_dir else self.vectors_dir.parent / "manifest"
        )
        self.device = device
        self.dtype_name = dtype
        self.dtype = networks.DTYPES[dtype]
        self.tolerance = tolerance
        # Check the warp network and decoder as the engine serves them (see serving.py).
        self.serving = serving
        self._modules: dict[str, nn.Module] = {}
        self.handlers: dict[str, Callable[[dict[str, np.ndarray]], Iterator[tuple]]] = {
            "appearance_extractor.npz": self._appearance,
            "motion_extractor.npz": self._motion,
            "transform_keypoint.npz": self._transform,
            "stitch_network.npz": self._stitch,
            "warp_network.npz": self._warp,
            "decoder.npz": self._decoder,
            "lmdm.npz": self._lmdm,
            CONSTANTS_FILE: self._constants,
        }

    # ------------------------------------------------------------------ plumbing
    def module(self, name: str) -> nn.Module:
        if name not in self._modules:
            # Only the LMDM has constant buffers; other checks work without the file.
            constants = (
                find_constants(self.manifest_dir, self.vectors_dir) if name == "lmdm" else None
            )
            source = networks.SyntheticSource(self.manifest_dir, constants)
            module = networks.synthetic_module(name, source, self.device, self.dtype)
            self._modules[name] = rewrite_for_serving(module) if self.serving else module
        return self._modules[name]

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return networks.to_tensor(array, self.device, self.dtype)

    def _result(self, file: str, array: str, ours: np.ndarray, ref: np.ndarray, dt: float):
        try:
            err = relative_l2(ours, ref)
        except ValueError as exc:
            return CheckResult(file, array, None, False, str(exc), dt)
        return CheckResult(file, array, err, err <= self.tolerance, "", dt)

    def files(self) -> list[Path]:
        return sorted(p for p in self.vectors_dir.glob("*.npz") if p.is_file())

    def run(self, progress: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
        results: list[CheckResult] = []

        def emit(result: CheckResult) -> None:
            results.append(result)
            if progress is not None:
                progress(result)

        if not self.vectors_dir.is_dir():
            emit(CheckResult(str(self.vectors_dir), "-", None, False, "not a directory"))
            return results
        files = self.files()
        if not files:
            emit(CheckResult(str(self.vectors_dir), "-", None, False, "no .npz files"))
        for path in files:
            for result in self.check_file(path):
                emit(result)
        names = {p.name for p in files}
        if {"appearance_extractor.npz", "transform_keypoint.npz", "decoder.npz"} <= names:
            for result in self.check_chain():
                emit(result)
        return results

    def check_file(self, path: Path) -> list[CheckResult]:
        handler = self.handlers.get(path.name)
        if handler is None:
            return [CheckResult(path.name, "-", None, False, "unknown vectors file")]
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except Exception as exc:  # a corrupt archive is reported, not raised
            return [CheckResult(path.name, "-", None, False, f"cannot read: {exc}")]
        out = []
        start = time.perf_counter()
        try:
            for array, ours, ref in handler(data):
                out.append(self._result(path.name, array, ours, ref, time.perf_counter() - start))
                start = time.perf_counter()
        except VectorSetError as exc:
            out.append(CheckResult(path.name, "-", None, False, f"missing array {exc}"))
        except Exception as exc:  # report and go on with the other files
            out.append(CheckResult(path.name, "-", None, False, f"{type(exc).__name__}: {exc}"))
        return out

    @staticmethod
    def _get(data: dict[str, np.ndarray], key: str) -> np.ndarray:
        if key not in data:
            raise VectorSetError(key)
        return data[key]

    # ------------------------------------------------------------------ handlers
    def _appearance(self, data):
        image = self._get(data, "image")
        ref = self._get(data, "feature_3d")
        yield (
            "feature_3d",
            networks.appearance_feature(self.module("appearance_extractor"), image),
            ref,
        )

    def _motion(self, data):
        image = self._get(data, "image")
        refs = {k: self._get(data, k) for k in MOTION_OUTPUTS}
        ours = networks.motion_info(self.module("motion_extractor"), image)
        for key in MOTION_OUTPUTS:
            yield key, ours[key], refs[key]

    def _transform(self, data):
        source = {k[4:]: v for k, v in data.items() if k.startswith("src_")}
        for key in MOTION_OUTPUTS:
            self._get(data, f"src_{key}")
        driving = dict(source)
        driving.update({k[4:]: v for k, v in data.items() if k.startswith("drv_")})
        yield "x_s", transform_keypoints(source), self._get(data, "x_s")
        yield "x_d", transform_keypoints(driving), self._get(data, "x_d")

    def _stitch(self, data):
        kp_s, kp_d = self._get(data, "kp_source"), self._get(data, "kp_driving")
        yield (
            "out",
            networks.stitch(self.module("stitch_network"), kp_s, kp_d),
            self._get(data, "out"),
        )

    def _warp(self, data):
        feature = self._get(data, "feature_3d")
        kp_s, kp_d = self._get(data, "kp_source"), self._get(data, "kp_driving")
        ref = self._get(data, "out")
        out = networks.warp_feature(self.module("warp_network"), feature, kp_s, kp_d)
        yield "out", networks.to_numpy(out), ref

    def _decoder(self, data):
        feature, ref = self._get(data, "feature"), self._get(data, "out")
        yield "out", networks.decode(self.module("decoder"), feature), ref

    @torch.inference_mode()
    def _lmdm(self, data):
        lmdm = self.module("lmdm")
        x, cond_frame, cond = (self.tensor(self._get(data, k)) for k in ("x", "cond_frame", "cond"))
        times = torch.from_numpy(self._get(data, "t")).to(self.device, torch.long)
        weight = float(self._get(data, "guidance_weight"))
        pred_noise, x_start = lmdm.predict(x, cond_frame, cond, times, weight)
        yield "pred_noise", networks.to_numpy(pred_noise), self._get(data, "pred_noise")
        yield "x_start", networks.to_numpy(x_start), self._get(data, "x_start")

        steps = int(self._get(data, "sampling_timesteps"))
        pairs = [tuple(int(v) for v in row) for row in self._get(data, "time_pairs")]
        ours_pairs = ddim_time_pairs(steps, lmdm.n_timestep)
        if ours_pairs != pairs:
            raise ValueError(f"DDIM time pairs differ: ours {ours_pairs}, reference {pairs}")
        noises = [self.tensor(n) for n in self._get(data, "ddim_noises")]
        out = lmdm.ddim_sample(
            cond_frame,
            cond,
            steps,
            x_init=self.tensor(self._get(data, "ddim_x_init")),
            noises=noises,
        )
        yield "ddim_out", networks.to_numpy(out), self._get(data, "ddim_out")

    def _constants(self, data):
        # The rotary buffers our LMDM computes when built must equal the upstream ones.
        fresh = networks.build_module("lmdm").model.state_dict()
        for key, ref in data.items():
            if key not in fresh:
                raise ValueError(f"constant {key!r} is not a buffer of the LMDM")
            yield key, fresh[key].numpy(), ref

    # ------------------------------------------------------------------ chain
    def check_chain(self) -> list[CheckResult]:
        """Source image -> appearance + motion -> keypoints -> warp -> decoder -> frame."""
        start = time.perf_counter()
        try:
            with np.load(self.vectors_dir / "appearance_extractor.npz") as npz:
                image = npz["image"]
            with np.load(self.vectors_dir / "transform_keypoint.npz") as npz:
                driving_override = {k[4:]: npz[k] for k in npz.files if k.startswith("drv_")}
            with np.load(self.vectors_dir / "decoder.npz") as npz:
                ref = npz["out"]
            feature_3d = networks.appearance_feature(self.module("appearance_extractor"), image)
            source = networks.motion_info(self.module("motion_extractor"), image)
            driving = {**source, **driving_override}
            frame = networks.render_frame(
                self.module("warp_network"), self.module("decoder"), feature_3d, source, driving
            )
        except Exception as exc:
            return [CheckResult(CHAIN, "frame", None, False, f"{type(exc).__name__}: {exc}")]
        return [self._result(CHAIN, "frame", frame, ref, time.perf_counter() - start)]


def verify(
    vectors_dir: Path | str,
    manifest_dir: Path | str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    tolerance: float = 1e-4,
    progress: Callable[[CheckResult], None] | None = None,
    serving: bool = False,
) -> list[CheckResult]:
    """All checks of a vectors folder; see `Verifier`.

    On CUDA in float32, TF32 is switched off for the run: cuDNN allows it for
    convolutions by default, and its 10-bit mantissa alone costs ~1e-3 relative error.
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if dtype == "float32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return Verifier(vectors_dir, manifest_dir, device, dtype, tolerance, serving).run(progress)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
