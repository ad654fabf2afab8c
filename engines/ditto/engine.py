"""DittoEngine: the Ditto talking-head pipeline behind the AvatarEngine interface.

Options (from config):
- ``weights``: ``"random"`` (seeded random weights of the official shapes, for
  benchmarking; every log line and the report say RANDOM WEIGHTS) or the checkpoint
  folder holding ``ditto_pytorch/`` and ``ditto_cfg/``.
- ``seed`` (random weights, default 0), ``dtype`` (``float32`` | ``bfloat16``: warp and
  decoder, the per-frame cost; the extractors, stitching and LMDM stay float32),
  ``sampling_timesteps`` (DDIM steps per window, default 50).

What runs: motion generation over 80-frame LMDM windows with overlap 10, motion
stitching (relative driving motion, lip/eye expression mix, gaze fix, stitching network),
keypoint transform, warp, decode and paste-back into the source image.

Not implemented yet (raises NotImplementedError naming the part):
- registration with the official face detection / landmark models (det_10g, 2d106det,
  landmark203, mediapipe) and the landmark-based crop; random-weights mode registers
  with a centred square crop instead, which is enough for benchmarking;
- the condition handler's 35 control dims (emotion, eye openness, eye ball, ...) from the
  config and the source landmarks; random-weights mode feeds zeros there;
- HuBERT features are computed with the official streaming ONNX file when a checkpoint
  folder is given; random-weights mode has no HuBERT file and feeds zero audio features.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base import (
    AvatarEngine,
    AvatarState,
    AvatarStream,
    EngineInputError,
    EngineReport,
    ProgressFn,
    no_progress,
)
from . import checkpoints, networks, synthetic
from .keypoints import bins_to_degrees, transform_keypoints
from .lmdm import LMDM
from .motion_gen import WindowedMotion, info_to_vector, vector_to_info

log = logging.getLogger("avatard.engines.ditto")

RANDOM_NOTE = "RANDOM WEIGHTS"
AUDIO_DIM = 1024
CONTROL_DIM = 35
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
CROP_SIZE = 256
MAX_SIDE = 4096
# Expression rows driven by the generated motion (lips and eyes); the rest stay the source's.
_LIP_ROWS = (6, 12, 14, 17, 19, 20)
_EYE_ROWS = (11, 13, 15, 16, 18)
HUBERT_CHUNK = (3, 5, 2)  # frames of left context, produced, look-ahead
LOOKAHEAD = HUBERT_CHUNK[2]


def module_state_template(module: torch.nn.Module) -> synthetic.Manifest:
    """A manifest made from a module's own state_dict (for random weights without the
    shared manifests at run time)."""
    entries = []
    for key, value in module.state_dict().items():
        if key.endswith("rotary.freqs"):
            kind = "constant"
        elif key.endswith(("weight_u", "weight_v")):
            kind = "spectral_uv"
        else:
            kind = "scheme"
        dtype = str(value.dtype).removeprefix("torch.")
        entries.append(synthetic.ManifestEntry(key, tuple(value.shape), dtype, kind))
    return synthetic.Manifest("", "", "", 0, tuple(entries), {})


@dataclass
class DittoAvatar:
    """Once-per-avatar state: the crop, its features and motion (cached per avatar)."""

    image: np.ndarray  # (H,W,3) uint8 source
    crop_box: tuple[int, int, int]  # x0, y0, side in source pixels
    feature_3d: torch.Tensor  # (1,32,16,64,64) on the device, render dtype
    source_info: dict[str, np.ndarray]  # motion-extractor outputs
    x_s: np.ndarray  # (1,21,3) source keypoints


class DittoEngine(AvatarEngine):
    name = "ditto"

    def __init__(self, device: str, options: dict[str, Any], progress: ProgressFn = no_progress):
        t0 = time.perf_counter()
        weights = options.get("weights")
        if weights is None:
            raise EngineInputError("weights", "set 'random' or the Ditto checkpoint folder")
        self.random_weights = weights == "random"
        self.device = device
        self.seed = int(options.get("seed", 0))
        dtype_name = str(options.get("dtype", "float32"))
        if dtype_name not in ("float32", "bfloat16"):
            raise EngineInputError("dtype", "must be float32 or bfloat16")
        self.render_dtype = networks.DTYPES[dtype_name]
        self.sampling_timesteps = int(options.get("sampling_timesteps", 50))
        self.cache_size = int(options.get("cache_size", 8))
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, AvatarState] = OrderedDict()
        self.cfg: Any = None
        self._hubert = None
        if device.startswith("cuda"):
            # The allocator's statistics exist only once CUDA is initialised on the device;
            # resetting them before that raises "Invalid device argument".
            torch.zeros(1, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            mem0 = torch.cuda.memory_allocated(device)
        else:
            mem0 = _rss_bytes()

        lmdm_config: dict[str, Any] = {}
        if not self.random_weights:
            root = Path(weights)
            self.cfg = checkpoints.load_cfg(root / checkpoints.CFG_RELPATH)
            lmdm_config = _lmdm_config_from_cfg(self.cfg)

        self.models: dict[str, torch.nn.Module] = {}
        names = synthetic.MODULES
        for i, name in enumerate(names):
            progress(f"ditto {name}", i / len(names))
            dtype = self.render_dtype if name in ("warp_network", "decoder") else torch.float32
            if self.random_weights:
                module = networks.build_module(name)
                target = networks.weight_target(module)
                state = synthetic.random_state_dict(module_state_template(target), self.seed)
                checkpoints.load_into(target, state, f"random {name}")
                self.models[name] = networks.place(module, device, dtype)
            else:
                self.models[name] = networks.checkpoint_module(
                    name, weights, device, dtype, lmdm_config if name == "lmdm" else None
                )
            self._log(f"loaded {name} ({dtype}) on {device}")
        if not self.random_weights:
            self._hubert = _open_hubert(Path(weights) / checkpoints.AUX_RELDIR, device)
        self._load_s = time.perf_counter() - t0
        self._warmup_s = 0.0
        if options.get("warmup", True):
            # One warp + decode at load: cuDNN picks its algorithms and CUDA allocates its
            # workspaces here rather than on a job's first frame.
            progress("ditto warm-up", 0.95)
            t1 = time.perf_counter()
            self._warm_up()
            self._warmup_s = time.perf_counter() - t1
            self._log(f"warm-up {self._warmup_s:.2f} s")
        progress("ditto ready", 1.0)
        if device.startswith("cuda"):
            self._memory_bytes = torch.cuda.max_memory_allocated(device) - mem0
        else:
            self._memory_bytes = max(_rss_bytes() - mem0, 0)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        feature = torch.zeros(1, 32, 16, 64, 64, device=self.device, dtype=self.render_dtype)
        kp = np.zeros((1, 21, 3), np.float32)
        warped = networks.warp_feature(self.models["warp_network"], feature, kp, kp)
        self.models["decoder"](warped)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ helpers
    def _log(self, message: str) -> None:
        log.info("%s%s", f"{RANDOM_NOTE}: " if self.random_weights else "", message)

    @property
    def lmdm(self) -> LMDM:
        return self.models["lmdm"]  # type: ignore[return-value]

    def report(self) -> EngineReport:
        notes = []
        if self.random_weights:
            notes.append(
                f"{RANDOM_NOTE} (seed {self.seed}): output is noise; benchmarking only; "
                "zero audio/control features, centred crop"
            )
        notes.append(f"render dtype {str(self.render_dtype).removeprefix('torch.')}")
        notes.append(f"{self.sampling_timesteps} DDIM steps")
        return EngineReport(
            name=self.name,
            kind=self.kind,
            device=self.device,
            memory_bytes=int(self._memory_bytes),
            warmup_s=self._warmup_s,
            notes="; ".join(notes),
        )

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        self.models.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ registration
    def default_portrait(self) -> bytes:
        """The public-domain portrait that ships with the embedded engine (no cv2 needed)."""
        from importlib import resources

        asset = resources.files("avatard.engines.embedded").joinpath("assets", "astronaut.jpg")
        return asset.read_bytes()

    def register(self, image: bytes | np.ndarray) -> AvatarState:
        if isinstance(image, bytearray | memoryview):
            image = bytes(image)
        if not isinstance(image, bytes | np.ndarray):
            raise EngineInputError("image", "must be encoded image bytes or an RGB uint8 array")
        rgb = _decode_image(image) if isinstance(image, bytes) else _check_array(image)
        avatar_id = hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        with self._lock:
            if avatar_id in self._cache:
                self._cache.move_to_end(avatar_id)
                return self._cache[avatar_id]
        if not self.random_weights:
            raise NotImplementedError(
                "Ditto registration with the official face detection and landmark models "
                "(det_10g, 2d106det, landmark203, mediapipe) and the landmark-based crop is "
                "not implemented yet"
            )
        crop, box = _center_crop(rgb, CROP_SIZE)
        image_t = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255)
        image_np = image_t.numpy()
        feature = networks.appearance_feature(self.models["appearance_extractor"], image_np)
        info = networks.motion_info(self.models["motion_extractor"], image_np)
        payload = DittoAvatar(
            image=rgb,
            crop_box=box,
            feature_3d=networks.to_tensor(feature, self.device, self.render_dtype),
            source_info=info,
            x_s=transform_keypoints(info),
        )
        state = AvatarState(avatar_id, rgb.shape[1], rgb.shape[0], payload, {"crop_box": box})
        with self._lock:
            self._cache[avatar_id] = state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._log(f"registered avatar {avatar_id[:12]} {rgb.shape[1]}x{rgb.shape[0]}")
        return state

    def open_stream(self, state: AvatarState, seed: int) -> DittoStream:
        if not isinstance(state.payload, DittoAvatar):
            raise EngineInputError("avatar", "was not registered with the ditto engine")
        return DittoStream(self, state.payload, int(seed))

    # ------------------------------------------------------------------ per-frame maths
    def audio_features(self, pcm: np.ndarray, start: int, end: int) -> np.ndarray:
        """(end-start, 1024) features of frames [start, end) of the clip `pcm` (16 kHz)."""
        if self._hubert is None:
            # Random-weights mode has no HuBERT file: zero features (see report notes).
            return np.zeros((end - start, AUDIO_DIM), np.float32)
        return _hubert_features(self._hubert, pcm, start, end)

    def conditions(self, audio_features: np.ndarray) -> np.ndarray:
        """(N,1059) LMDM conditions: audio features + control dims."""
        if not self.random_weights:
            raise NotImplementedError(
                "the condition handler (emotion, eye openness/ball and the other control "
                "dims from the config and source landmarks) is not implemented yet"
            )
        controls = np.zeros((len(audio_features), CONTROL_DIM), np.float32)
        return np.concatenate([audio_features, controls], axis=1)

    @torch.inference_mode()
    def sample_window(
        self, reference: np.ndarray, cond: np.ndarray, generator: torch.Generator
    ) -> np.ndarray:
        """One DDIM run of the LMDM: (1,265) reference, (1,80,1059) -> (1,80,265)."""
        dev = self.device
        out = self.lmdm.ddim_sample(
            torch.from_numpy(reference).to(dev),
            torch.from_numpy(cond).to(dev),
            self.sampling_timesteps,
            generator=generator,
        )
        return networks.to_numpy(out)

    def driving_keypoints(
        self, avatar: DittoAvatar, motion: np.ndarray, first_motion: np.ndarray
    ) -> np.ndarray:
        """Motion stitch for an image source: driving motion relative to the first
        generated frame, lips and eyes from the driving expression, gaze correction, then
        the stitching network. Returns x_d (1,21,3)."""
        src = avatar.source_info
        drv = vector_to_info(motion)
        d0 = vector_to_info(first_motion)
        info = dict(src)
        for key in ("exp", "pitch", "yaw", "roll", "t"):
            info[key] = src[key] + (drv[key] - d0[key])
        rows = np.zeros((21, 3), np.float32)
        rows[list(_LIP_ROWS + _EYE_ROWS)] = 1
        mix = rows.reshape(1, -1)
        info["exp"] = info["exp"] * mix + src["exp"] * (1 - mix)
        info["exp"] = _fix_gaze(info, src)
        x_d = transform_keypoints(info)
        return networks.stitch(self.models["stitch_network"], avatar.x_s, x_d)

    @torch.inference_mode()
    def render(self, avatar: DittoAvatar, x_d: np.ndarray) -> np.ndarray:
        """Warp + decode + paste-back: (H,W,3) uint8 frame at the source size."""
        warped = networks.warp_feature(
            self.models["warp_network"], avatar.feature_3d, avatar.x_s, x_d
        )
        face = self.models["decoder"](warped).float()  # (1,3,512,512) in [0,1]
        return _paste_back(avatar.image, face, avatar.crop_box)


def _lmdm_config_from_cfg(cfg: Any) -> dict[str, Any]:
    """The LMDM constructor arguments the pipeline config sets (upstream reads
    motion_feat_dim, audio_feat_dim and seq_frames from cfg['audio2motion_cfg'])."""
    section = cfg.get("audio2motion_cfg") if isinstance(cfg, dict) else None
    if not isinstance(section, dict):
        raise checkpoints.CheckpointError(
            f"{checkpoints.CFG_RELPATH}: no 'audio2motion_cfg' section in the config"
        )
    keys = ("motion_feat_dim", "audio_feat_dim", "seq_frames")
    return {k: int(section[k]) for k in keys if k in section}


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _fix_gaze(info: dict[str, np.ndarray], src: dict[str, np.ndarray]) -> np.ndarray:
    """Shift the eye-ball expression entries with the head's yaw/pitch change so the gaze
    follows the head (upstream's ratios and coefficients)."""
    exp = info["exp"].copy()
    dx = (float(bins_to_degrees(info["yaw"])[0]) - float(bins_to_degrees(src["yaw"])[0])) * 0.26
    dy = (float(bins_to_degrees(info["pitch"])[0]) - float(bins_to_degrees(src["pitch"])[0])) * 0.28
    if dx > 0:
        exp[0, 33] += dx * 0.0007
        exp[0, 45] += dx * 0.001
    else:
        exp[0, 33] += dx * 0.001
        exp[0, 45] += dx * 0.0007
    exp[0, 34] += dy * -0.001
    exp[0, 46] += dy * -0.001
    return exp


class DittoStream(AvatarStream):
    """One job. Audio -> conditions -> LMDM windows (80 frames, a new one every 70) ->
    frames. A window runs once the audio it needs (its frames plus the encoder's
    look-ahead) has arrived, and a frame is emitted once no later window can change its
    motion, so the output does not depend on how the audio was chunked. The offline
    pipeline's final whole-clip smoothing pass is not applied (it would make early frames
    depend on later audio)."""

    def __init__(self, engine: DittoEngine, avatar: DittoAvatar, seed: int):
        self.engine = engine
        self.avatar = avatar
        self.seed = seed
        self.motion = WindowedMotion(
            info_to_vector(avatar.source_info), seq_frames=engine.lmdm.seq_frames, overlap=10
        )
        self.pcm = np.zeros(0, np.float32)
        self.emitted = 0
        self.finished = False

    def _run_windows(self, final: bool) -> None:
        frames_known = len(self.pcm) // SAMPLES_PER_FRAME
        total = round(len(self.pcm) / SAMPLES_PER_FRAME) if final else frames_known
        seq = self.motion.seq_frames
        while True:
            start = self.motion.next_start()
            if start >= total or (not final and start + seq + LOOKAHEAD > frames_known):
                break
            end = min(start + seq, total) if final else start + seq
            # Audio up to the window's end plus the encoder's look-ahead: the same slice
            # whatever the chunking, because a non-final window waits for all of it.
            pcm = self.pcm[: (end + LOOKAHEAD) * SAMPLES_PER_FRAME]
            feats = self.engine.audio_features(pcm, start, end)
            cond = self.engine.conditions(feats)  # (end-start, 1059)
            window_cond = self.motion.window_condition(cond, offset=start)
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.motion.windows)
            self.motion.add(
                self.engine.sample_window(self.motion.reference, window_cond, generator)
            )

    def _drain(self, limit: int) -> list[np.ndarray]:
        frames = []
        motion = self.motion.motion[0]
        while self.emitted < limit:
            x_d = self.engine.driving_keypoints(self.avatar, motion[self.emitted], motion[0])
            frames.append(self.engine.render(self.avatar, x_d))
            self.emitted += 1
        return frames

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        if self.finished:
            raise EngineInputError("audio", "stream already finished")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self.pcm = np.concatenate([self.pcm, pcm])
        self._run_windows(final=False)
        return self._drain(self.motion.settled)

    def finish(self) -> list[np.ndarray]:
        self.finished = True
        self._run_windows(final=True)
        total = round(len(self.pcm) / SAMPLES_PER_FRAME)
        return self._drain(min(total, self.motion.motion.shape[1]))


# ---------------------------------------------------------------------- image helpers


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise EngineInputError("image", "array must be (H, W, 3) uint8 RGB")
    _check_size(array.shape[1], array.shape[0])
    return np.ascontiguousarray(array)


def _check_size(width: int, height: int) -> None:
    if min(width, height) < 64 or max(width, height) > MAX_SIDE:
        raise EngineInputError("image", f"sides must be 64..{MAX_SIDE} px, got {width}x{height}")


def _decode_image(data: bytes) -> np.ndarray:
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pillow is an optional dependency
        raise EngineInputError("image", "encoded images need pillow; pass an RGB array") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            return _check_array(np.asarray(img, dtype=np.uint8))
    except EngineInputError:
        raise
    except Exception as exc:
        raise EngineInputError("image", f"cannot decode image: {exc}") from None


def _center_crop(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    h, w = rgb.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    patch = torch.from_numpy(rgb[y0 : y0 + side, x0 : x0 + side]).permute(2, 0, 1)[None].float()
    patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)
    crop = patch[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return crop, (x0, y0, side)


def _paste_back(image: np.ndarray, face: torch.Tensor, box: tuple[int, int, int]) -> np.ndarray:
    """Resize the (1,3,512,512) face into the crop box and blend it with a feathered mask."""
    x0, y0, side = box
    resized = F.interpolate(face, size=(side, side), mode="bilinear", antialias=True)[0]
    face_np = resized.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255
    ramp = np.minimum(np.arange(side), np.arange(side)[::-1]) / max(side * 0.06, 1)
    edge = np.clip(ramp, 0, 1).astype(np.float32)
    mask = (edge[:, None] * edge[None, :])[..., None]
    out = image.astype(np.float32)
    region = out[y0 : y0 + side, x0 : x0 + side]
    out[y0 : y0 + side, x0 : x0 + side] = region * (1 - mask) + face_np * mask
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- HuBERT


def _open_hubert(aux_dir: Path, device: str):
    """onnxruntime session of the streaming HuBERT encoder."""
    path = aux_dir / "hubert_streaming_fix_kv.onnx"
    if not path.is_file():
        raise checkpoints.CheckpointError(f"HuBERT model {path} does not exist")
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, (os.cpu_count() or 2) // 2)
    return ort.InferenceSession(str(path), options, providers=providers)


def _hubert_features(session, pcm: np.ndarray, start: int, end: int) -> np.ndarray:
    """Frames [start, end) of the offline chunking of the streaming encoder: windows of
    6480 samples (3+5+2 frames of 40 ms plus 80 samples) every 5 frames from frame 0; of
    each window's 50 Hz outputs, the rows of the 5 produced frames are averaged in pairs
    to 25 fps. Audio beyond `pcm` is zeros."""
    left, mid, right = HUBERT_CHUNK
    window = int(sum(HUBERT_CHUNK) * 0.04 * 16000) + 80  # 6480
    lead = window - int((mid + right) * 0.04 * 16000)
    padded = np.concatenate(
        [np.zeros(lead, np.float32), pcm.astype(np.float32), np.zeros(window, np.float32)]
    )
    input_name = session.get_inputs()[0].name
    first = start - start % mid  # chunks are aligned to multiples of 5 frames
    out = []
    for i in range(first, end, mid):
        offset = int(i * 0.04 * 16000)
        chunk = padded[offset : offset + window]
        if len(chunk) < window:
            chunk = np.pad(chunk, (0, window - len(chunk)))
        encoding = session.run(None, {input_name: chunk.reshape(1, -1)})[0]
        encoding = encoding.reshape(-1, AUDIO_DIM)
        rows = encoding[-(mid + right) * 2 : -right * 2]
        out.append(rows.reshape(mid, 2, AUDIO_DIM).mean(axis=1))
    feats = np.concatenate(out, axis=0) if out else np.zeros((0, AUDIO_DIM), np.float32)
    return feats[start - first : end - first].astype(np.float32)
