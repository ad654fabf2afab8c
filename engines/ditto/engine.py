"""DittoEngine: the Ditto talking-head pipeline behind the AvatarEngine interface.

Options: `DittoOptions` (options.py; the table is in docs/config.md): ``weights`` is
``"random"`` (seeded random weights of the official shapes, for benchmarking; every log
line and the report say RANDOM WEIGHTS) or the checkpoint folder holding
``ditto_pytorch/`` (networks and aux models) and ``ditto_cfg/``; the rest are quality and
speed switches. Those left unset whose best value depends on the device (batch sizes, CUDA
graphs, torch.compile) are resolved here, once the device is known.

What runs: registration (face detection, landmarks, the landmark-based crop; see
registration.py), source features once per avatar, HuBERT audio features, the condition
handler (conditions.py), motion generation over 80-frame LMDM windows with overlap 10,
motion clipping and stitching (relative driving motion, lip/eye expression mix, gaze fix,
stitching network), keypoint transform, warp, decode and paste-back into the source image.
Per-frame work goes through batchers (batcher.py) shared by every stream of the worker.

Random-weights mode has no aux models, HuBERT file or cfg: it registers with a centred
square crop and feeds zero audio features and zero control dims, which is enough to
measure the compute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avatard.ipc.procmem import rss_bytes

from ..base import (
    AvatarEngine,
    AvatarState,
    AvatarStream,
    EngineInputError,
    EngineReport,
    ProgressFn,
    no_progress,
)
from ..images import decode_image
from ..options import as_options
from . import checkpoints, conditions, networks, random_checkpoint, synthetic
from .batcher import Batcher, drain_futures
from .graphs import GraphedCall
from .keypoints import bins_to_degrees, transform_keypoints
from .lmdm import LMDM, ddim_time_pairs
from .motion_gen import WindowedMotion, info_to_vector, vectors_to_info
from .networks import module_state_template
from .options import DittoOptions
from .registration import CROP_SIZE as FACE_SIZE
from .registration import PasteBack, Registrar, RegistrationError
from .serving import rewrite_for_serving

log = logging.getLogger("avatard.engines.ditto")

RANDOM_NOTE = "RANDOM WEIGHTS"
AUDIO_DIM = 1024
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
CROP_SIZE = 256
MAX_SIDE = 4096
# Expression rows driven by the generated motion (lips and eyes); the rest stay the source's.
_LIP_ROWS = (6, 12, 14, 17, 19, 20)
_EYE_ROWS = (11, 13, 15, 16, 18)
HUBERT_CHUNK = (3, 5, 2)  # frames of left context, produced, look-ahead
LOOKAHEAD = HUBERT_CHUNK[2]
RESULT_TIMEOUT_S = 300.0  # longest wait for one batched frame or window


@dataclass
class DittoAvatar:
    """Once-per-avatar state: the crop, its features and motion (cached per avatar)."""

    image: np.ndarray  # (H,W,3) uint8 source (after registration's resize, if any)
    crop_box: tuple[int, int, int] | None  # x0, y0, side of the centred crop (random mode)
    feature_3d: torch.Tensor  # (1,32,16,64,64) on the device, render dtype
    source_info: dict[str, np.ndarray]  # motion-extractor outputs
    x_s: np.ndarray  # (1,21,3) source keypoints
    paster: PasteBack | None = None  # blends decoded faces into `image`, on the device
    cond_source: conditions.ConditionSource | None = None  # for the condition handler


class DittoEngine(AvatarEngine):
    name = "ditto"
    thread_safe = True

    def __init__(self, device: str, options: DittoOptions | dict[str, Any] | None = None,
                 progress: ProgressFn = no_progress):
        t0 = time.perf_counter()
        self.options = opts = as_options(DittoOptions, options, "engines.options.ditto")
        weights = opts.weights
        self.random_weights = weights == "random"
        # A folder written by random_checkpoint (for testing the loading path) is random
        # too, and every log line and report must say so as well.
        self.random_folder = not self.random_weights and (
            Path(weights) / random_checkpoint.MARKER_FILE
        ).exists()
        self.device = device
        self.seed = opts.seed
        self.render_dtype = networks.DTYPES[opts.dtype]
        cuda = device.startswith("cuda")
        self.sampling_timesteps = opts.sampling_timesteps
        self.cache_size = opts.cache_size
        # Frames per warp + decode batch (across all of this worker's streams) and LMDM
        # windows per sampling batch; the wait bounds how long a lone item waits for company.
        # None in the options: the device's default (a GPU is fed best in larger batches).
        self.max_batch = opts.max_batch if opts.max_batch is not None else 16 if cuda else 4
        self.max_windows = (opts.max_windows if opts.max_windows is not None
                            else 16 if cuda else 4)
        # CUDA-only switches: on by default with CUDA, never on a CPU whatever they say.
        self.cuda_graphs = cuda and opts.cuda_graphs is not False
        self.channels_last = opts.channels_last
        self._lock = threading.Lock()
        self._register_lock = threading.Lock()
        self._cache: OrderedDict[str, AvatarState] = OrderedDict()
        self.cfg: Any = None
        self._hubert = None
        if cuda:
            # The allocator's statistics exist only once CUDA is initialised on the device;
            # resetting them before that raises "Invalid device argument".
            torch.zeros(1, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            mem0 = torch.cuda.memory_allocated(device)
        else:
            mem0 = rss_bytes()

        lmdm_config: dict[str, Any] = {}
        self.registrar: Registrar | None = None
        if not self.random_weights:
            self.cfg = checkpoints.load_cfg(Path(weights) / checkpoints.CFG_RELPATH)
            lmdm_config = _lmdm_config_from_cfg(self.cfg)
            try:
                conditions.check_width(self.cfg)
            except conditions.ConditionError as exc:
                raise checkpoints.CheckpointError(f"{checkpoints.CFG_RELPATH}: {exc}") from None

        self.models: dict[str, torch.nn.Module] = self._load_networks(lmdm_config, progress)
        self.serving_layers = opts.serving_layers
        self.compiled = cuda and opts.compile is not False
        self._prepare_render_networks(cudnn_benchmark=cuda and opts.cudnn_benchmark)
        # Priority -1: ahead of the default stream's 0 (lower numbers run first).
        self._lmdm_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        self._warp_decode = GraphedCall("warp+decode", self._warp_decode_eager, self.cuda_graphs)
        self._ddim = GraphedCall("lmdm-ddim", self._ddim_eager, self.cuda_graphs)
        self._frame_batcher: Batcher = Batcher(
            "frames", self._launch_render, self.max_batch, opts.batch_wait_ms / 1000,
            finish=self._finish_render,
        )
        self._window_batcher: Batcher = Batcher(
            "windows", self._sample_items, self.max_windows, opts.batch_wait_ms / 1000
        )
        if not self.random_weights:
            self._hubert = _open_hubert(Path(weights) / checkpoints.AUX_RELDIR, device)
            flags = conditions.handler_flags(self.cfg)
            eyes = flags["use_eye_open"] or flags["use_eye_ball"]
            self.registrar = Registrar.from_checkpoint(weights, self.cfg, device, eyes=eyes)
        self._load_s = time.perf_counter() - t0
        self._warmup_s = 0.0
        if opts.warmup:
            # One warp + decode at load: cuDNN picks its algorithms and CUDA allocates its
            # workspaces here rather than on a job's first frame.
            progress("ditto warm-up", 0.95)
            t1 = time.perf_counter()
            self._warm_up()
            self._warmup_s = time.perf_counter() - t1
            self._log(f"warm-up {self._warmup_s:.2f} s")
        progress("ditto ready", 1.0)
        if cuda:
            self._memory_bytes = torch.cuda.max_memory_allocated(device) - mem0
        else:
            self._memory_bytes = max(rss_bytes() - mem0, 0)

    def _load_networks(self, lmdm_config: dict[str, Any],
                       progress: ProgressFn) -> dict[str, torch.nn.Module]:
        """The six networks on the device: seeded random weights, or the checkpoint's."""
        models: dict[str, torch.nn.Module] = {}
        names = synthetic.MODULES
        for i, name in enumerate(names):
            progress(f"ditto {name}", i / len(names))
            dtype = self.render_dtype if name in ("warp_network", "decoder") else torch.float32
            if self.random_weights:
                module = networks.build_module(name)
                target = networks.weight_target(module)
                state = synthetic.random_state_dict(module_state_template(target), self.seed)
                checkpoints.load_into(target, state, f"random {name}")
                models[name] = networks.place(module, self.device, dtype)
            else:
                models[name] = networks.checkpoint_module(
                    name, self.options.weights, self.device, dtype,
                    lmdm_config if name == "lmdm" else None,
                )
            self._log(f"loaded {name} ({dtype}) on {self.device}")
        return models

    def _prepare_render_networks(self, cudnn_benchmark: bool) -> None:
        """Serving layers, cuDNN autotuning, memory layout and compilation of warp and
        decoder, as `serving_layers`, `cudnn_benchmark`, `channels_last` and `compiled`
        ask."""
        if self.serving_layers:
            # Same function, tensor-core friendly shapes (serving.py): the dense-motion
            # mask conv alone was 29 % of a bf16 render batch on an H100 as loaded.
            for name in ("warp_network", "decoder"):
                self.models[name] = rewrite_for_serving(self.models[name])
        if cudnn_benchmark:
            # Fixed input shapes: let cuDNN time its algorithms once per shape and keep the
            # fastest (the first call of each batch size pays for it, in the warm-up).
            torch.backends.cudnn.benchmark = True
        if self.channels_last:
            # The decoder is 2D convolutions on 64..512 px maps: NHWC lets cuDNN use its
            # tensor-core kernels without layout transposes (measured faster on the H100).
            self.models["decoder"].to(memory_format=torch.channels_last)
        if self.compiled:
            # Inductor fuses the decoder's norm/modulation/activation chains, which are
            # memory-bound at 512 px. Shapes are kept to two (1 and max_batch frames; see
            # _render_items) so it compiles twice, in the warm-up.
            self._eager = {name: self.models[name] for name in ("warp_network", "decoder")}
            for name, module in self._eager.items():
                self.models[name] = torch.compile(module, dynamic=False)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """cuDNN algorithm choice, workspaces and (on CUDA) the graphs of the batch sizes a
        busy worker uses most: one frame, a full batch, and a single LMDM window."""
        try:
            self._warm_up_render()
        except Exception as exc:
            if not self.compiled:
                raise
            # torch.compile needs a working Triton/C toolchain; without one, serve eager.
            log.warning("torch.compile failed (%s: %s); running warp and decoder eagerly",
                        type(exc).__name__, str(exc)[:300])
            self.models.update(self._eager)
            self.compiled = False
            self._warp_decode = GraphedCall(
                "warp+decode", self._warp_decode_eager, self.cuda_graphs
            )
            self._warm_up_render()
        if self.cuda_graphs:
            seq, dim = self.lmdm.seq_frames, self.lmdm.motion_feat_dim
            window = (
                np.zeros(dim, np.float32),
                np.zeros((seq, self.condition_dim), np.float32),
                np.zeros((seq, dim), np.float32),
                np.zeros((self.noise_steps, seq, dim), np.float32),
            )
            for n in self.window_buckets:
                self._sample_items([window] * n)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _warm_up_render(self) -> None:
        sizes = self.frame_buckets if self.cuda_graphs or self.compiled else [1]
        for n in sizes:
            feature = torch.zeros(n, 32, 16, 64, 64, device=self.device, dtype=self.render_dtype)
            kp = torch.zeros(n, 21, 3, device=self.device)
            self._warp_decode(feature, kp, kp)

    # ------------------------------------------------------------------ helpers
    def _log(self, message: str) -> None:
        random = self.random_weights or self.random_folder
        log.info("%s%s", f"{RANDOM_NOTE}: " if random else "", message)

    @property
    def lmdm(self) -> LMDM:
        return self.models["lmdm"]  # type: ignore[return-value]

    @property
    def frame_buckets(self) -> list[int]:
        """Batch sizes warp + decode runs at on CUDA (others are padded up to one):
        powers of two up to max_batch, or just 1 and max_batch when compiled."""
        if self.compiled:
            return sorted({1, self.max_batch})
        return _powers_of_two(self.max_batch)

    @property
    def window_buckets(self) -> list[int]:
        return _powers_of_two(self.max_windows)

    @property
    def condition_dim(self) -> int:
        """Width of the LMDM's per-frame condition: 1024 audio + the control dims."""
        return int(self.lmdm.model.cond_projection.in_features)

    def report(self) -> EngineReport:
        notes = []
        if self.random_weights:
            notes.append(
                f"{RANDOM_NOTE} (seed {self.seed}): output is noise; benchmarking only; "
                "zero audio/control features, centred crop"
            )
        if self.random_folder:
            notes.append(
                f"{RANDOM_NOTE}: the checkpoint folder holds {random_checkpoint.MARKER_FILE}; "
                "output is noise; for testing the loading path only"
            )
        notes.append(f"render dtype {str(self.render_dtype).removeprefix('torch.')}")
        notes.append(f"{self.sampling_timesteps} DDIM steps")
        notes.append(f"batches of <= {self.max_batch} frames, <= {self.max_windows} windows")
        if self.serving_layers:
            notes.append("serving layers")
        if self.compiled:
            notes.append("torch.compile")
        if self.cuda_graphs:
            notes.append("CUDA graphs")
        return EngineReport(
            name=self.name,
            kind=self.kind,
            device=self.device,
            memory_bytes=int(self._memory_bytes),
            warmup_s=self._warmup_s,
            notes="; ".join(notes),
        )

    def close(self) -> None:
        self._frame_batcher.close()
        self._window_batcher.close()
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
        rgb = (_decode_image(image, self.options.background) if isinstance(image, bytes)
               else _check_array(image))
        avatar_id = hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        with self._lock:
            if avatar_id in self._cache:
                self._cache.move_to_end(avatar_id)
                return self._cache[avatar_id]
        box: tuple[int, int, int] | None = None
        registration = None
        if self.registrar is not None:
            # Face detection, landmarks and the landmark-based crop (official aux models).
            try:
                # One registration at a time: mediapipe's landmarker is not documented as
                # safe across threads, and registration runs once per avatar anyway.
                with self._register_lock:
                    registration = self.registrar.register(rgb)
            except RegistrationError as exc:
                raise EngineInputError("image", str(exc)) from None
            source, crop_np = registration.image, registration.crop_tensor().numpy()
            m_c2o = registration.m_c2o
        else:
            # Random weights: no aux models; a centred square crop stands in.
            crop, box = _center_crop(rgb, CROP_SIZE)
            crop_np = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).numpy()
            source = rgb
            x0, y0, side = box
            m_c2o = np.array([[side / FACE_SIZE, 0, x0], [0, side / FACE_SIZE, y0], [0, 0, 1]])
        feature = networks.appearance_feature(self.models["appearance_extractor"], crop_np)
        info = networks.motion_info(self.models["motion_extractor"], crop_np)
        payload = DittoAvatar(
            image=source,
            crop_box=box,
            feature_3d=networks.to_tensor(feature, self.device, self.render_dtype),
            source_info=info,
            x_s=transform_keypoints(info),
            paster=PasteBack(source, m_c2o, self.device),
            cond_source=(
                conditions.ConditionSource.from_registration(registration, info)
                if registration is not None else None
            ),
        )
        extras = {"crop_box": box} if box is not None else {}
        state = AvatarState(avatar_id, source.shape[1], source.shape[0], payload, extras)
        with self._lock:
            self._cache[avatar_id] = state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._log(f"registered avatar {avatar_id[:12]} {rgb.shape[1]}x{rgb.shape[0]}")
        return state

    def cached_avatars(self) -> int:
        """Portraits this engine's cache holds (the worker reports it in heartbeats)."""
        return len(self._cache)

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

    def conditions(self, audio_features: np.ndarray, avatar: DittoAvatar, start: int
                   ) -> np.ndarray:
        """(N, condition_dim) LMDM conditions of clip frames start..start+N-1: audio
        features + the condition handler's control dims (emotion, eyes, source keypoints,
        as the cfg enables them). Random-weights mode has no cfg: zeros."""
        if self.cfg is None or avatar.cond_source is None:
            controls = np.zeros((len(audio_features), self.condition_dim - AUDIO_DIM), np.float32)
            return np.concatenate([audio_features, controls], axis=1)
        return conditions.build_condition(audio_features, self.cfg, avatar.cond_source, start)

    @property
    def noise_steps(self) -> int:
        """Noise draws per DDIM run after the initial one (every step but the last)."""
        return len(ddim_time_pairs(self.sampling_timesteps, self.lmdm.n_timestep)) - 1

    def sample_window(
        self,
        reference: np.ndarray,
        cond: np.ndarray,
        generator: torch.Generator,
        deadline_s: float | None = None,
    ) -> np.ndarray:
        """One DDIM run of the LMDM: (1,265) reference, (1,80,1059) -> (1,80,265). The
        noise is drawn here, from the stream's own generator and in upstream's order
        (start, then one per step), so a window does not depend on which other streams'
        windows share its batch."""
        shape = (1, cond.shape[1], self.lmdm.motion_feat_dim)
        x_init = torch.randn(shape, generator=generator)
        noises = [torch.randn(shape, generator=generator) for _ in range(self.noise_steps)]
        noise = torch.cat(noises).numpy() if noises else np.zeros((0,) + shape[1:], np.float32)
        item = (reference.reshape(-1), cond[0], x_init[0].numpy(), noise)
        deadline = [deadline_s] if deadline_s is not None else None
        future = self._window_batcher.submit([item], deadline)[0]
        return next(drain_futures([future], RESULT_TIMEOUT_S, "LMDM window"))[None]

    def _ddim_eager(
        self, cond_frame: torch.Tensor, cond: torch.Tensor, x_init: torch.Tensor,
        noises: torch.Tensor,
    ) -> torch.Tensor:
        return self.lmdm.ddim_sample(
            cond_frame, cond, self.sampling_timesteps, x_init=x_init, noises=list(noises)
        )

    def _sample_items(self, items: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        """A batch of windows: (reference, cond, x_init, noises) each -> (80,265) each.

        On CUDA it runs on a stream of its own with high priority: the DDIM loop is
        hundreds of small kernels that leave most of the GPU idle, so they fit between
        the render batches' kernels instead of waiting behind them."""
        if self._lmdm_stream is None:
            return self._sample_on_current_stream(items)
        with torch.cuda.stream(self._lmdm_stream):
            return self._sample_on_current_stream(items)

    @torch.inference_mode()
    def _sample_on_current_stream(self, items: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        dev = self.device
        ref = torch.from_numpy(np.stack([i[0] for i in items])).to(dev)
        cond = torch.from_numpy(np.stack([i[1] for i in items])).to(dev)
        x_init = torch.from_numpy(np.stack([i[2] for i in items])).to(dev)
        noises = torch.from_numpy(np.stack([i[3] for i in items], axis=1)).to(dev)
        n = len(items)
        if self.cuda_graphs:
            bucket = _bucket(n, self.window_buckets)
            ref, cond, x_init = (_pad(t, bucket) for t in (ref, cond, x_init))
            noises = _pad(noises.transpose(0, 1), bucket).transpose(0, 1)
        return list(networks.to_numpy(self._ddim(ref, cond, x_init, noises)[:n]))

    def driving_keypoints(
        self, avatar: DittoAvatar, motion: np.ndarray, first_motion: np.ndarray
    ) -> np.ndarray:
        """Motion stitch for an image source, for N frames at once: driving motion
        (N,265) relative to the first generated frame, lips and eyes from the driving
        expression, gaze correction, then the stitching network. Returns x_d (N,21,3)."""
        motion = np.asarray(motion, np.float32).reshape(-1, self.lmdm.motion_feat_dim)
        if self.cfg is not None:
            # The cfg's per-dim motion limits apply where motion becomes keypoints (the
            # windows keep the unclipped motion for their reference frame).
            motion = conditions.clip_motion(motion, self.cfg)
            first_motion = conditions.clip_motion(first_motion, self.cfg)
        n = len(motion)
        src = avatar.source_info
        drv = vectors_to_info(motion)
        d0 = vectors_to_info(np.asarray(first_motion, np.float32).reshape(1, -1))
        info = {key: np.repeat(value, n, axis=0) for key, value in src.items()}
        for key in ("exp", "pitch", "yaw", "roll", "t"):
            info[key] = src[key] + (drv[key] - d0[key])
        rows = np.zeros((21, 3), np.float32)
        rows[list(_LIP_ROWS + _EYE_ROWS)] = 1
        mix = rows.reshape(1, -1)
        info["exp"] = info["exp"] * mix + src["exp"] * (1 - mix)
        info["exp"] = _fix_gaze(info, src)
        x_d = transform_keypoints(info)
        x_s = np.repeat(avatar.x_s, n, axis=0)
        return networks.stitch(self.models["stitch_network"], x_s, x_d)

    def submit_frames(
        self,
        avatar: DittoAvatar,
        x_d: np.ndarray,
        deadlines: list[float] | None = None,
        first_alone: bool = False,
    ) -> list:
        """Queue N frames (x_d (N,21,3)) for batched warp + decode + paste-back; one
        Future per frame, resolved to its (H,W,3) uint8 frame. `deadlines` order them
        against other streams' frames (earliest first); `first_alone` renders the first
        in a batch of its own so it leaves sooner (a stream's first frame)."""
        items = [(avatar, x) for x in np.asarray(x_d, np.float32)]
        return self._frame_batcher.submit(items, deadlines, cut_after_first=first_alone)

    def render(self, avatar: DittoAvatar, x_d: np.ndarray) -> np.ndarray:
        """One frame, waited for: (H,W,3) uint8 at the source size."""
        futures = self.submit_frames(avatar, np.asarray(x_d).reshape(1, 21, 3))
        return next(drain_futures(futures, RESULT_TIMEOUT_S, "frame"))

    def _warp_decode_eager(
        self, feature: torch.Tensor, kp_s: torch.Tensor, kp_d: torch.Tensor
    ) -> torch.Tensor:
        warped = self.models["warp_network"](feature, kp_s, kp_d)
        return self.models["decoder"](warped)

    def _render_items(self, items: list[tuple[DittoAvatar, np.ndarray]]) -> list[np.ndarray]:
        """Warp + decode + paste-back of a batch of frames, waited for (see `_launch_render`)."""
        return self._finish_render(self._launch_render(items))

    @torch.inference_mode()
    def _launch_render(self, items: list[tuple[DittoAvatar, np.ndarray]]) -> _LaunchedFrames:
        """Queue warp + decode for a batch of frames (any mix of avatars), paste each face
        back into its source image on the device, and start one host copy per group of
        equal-sized frames. The warped feature never leaves the device. On CUDA nothing
        here waits for the device: inputs go up from pinned memory, outputs come down into
        pinned memory, and `_finish_render` waits for the copies."""
        dev = self.device
        cuda = dev.startswith("cuda")
        avatars = [avatar for avatar, _ in items]
        kp_s = _upload(np.stack([a.x_s[0] for a in avatars]), dev)
        kp_d = _upload(np.stack([x for _, x in items]), dev)
        if all(a is avatars[0] for a in avatars):
            feature = avatars[0].feature_3d.expand(len(items), -1, -1, -1, -1)
        else:
            feature = torch.cat([a.feature_3d for a in avatars])
        n = len(items)
        if self.cuda_graphs or self.compiled:
            # Only a few batch sizes, each captured (and compiled) once at warm-up: a new
            # size met mid-job would cost a capture or a compile while streams wait.
            bucket = _bucket(n, self.frame_buckets)
            kp_s, kp_d, feature = (_pad(t, bucket) for t in (kp_s, kp_d, feature))
        faces = self._warp_decode(feature, kp_s, kp_d)[:n]
        groups: list[torch.Tensor] = []
        start = 0
        while start < n:  # runs of the same avatar paste back as one batch
            end = start + 1
            while end < n and avatars[end] is avatars[start]:
                end += 1
            paster = avatars[start].paster
            assert paster is not None
            pasted = paster(faces[start:end])
            groups.append(pasted.to("cpu", non_blocking=True) if cuda else pasted.cpu())
            start = end
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        return _LaunchedFrames(groups, done)

    @staticmethod
    def _finish_render(launched: _LaunchedFrames) -> list[np.ndarray]:
        if launched.done is not None:
            launched.done.synchronize()
        return [frame for group in launched.groups for frame in group.numpy()]


@dataclass
class _LaunchedFrames:
    """A render batch in flight: host tensors (filled once `done` has passed) per avatar
    group, in item order."""

    groups: list[torch.Tensor]
    done: torch.cuda.Event | None


def _upload(array: np.ndarray, device: str) -> torch.Tensor:
    """A small host array onto `device` without waiting for the device's queued work (a
    copy from pageable memory would wait for the stream; pinned memory does not)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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


def _fix_gaze(info: dict[str, np.ndarray], src: dict[str, np.ndarray]) -> np.ndarray:
    """Shift the eye-ball expression entries with the head's yaw/pitch change so the gaze
    follows the head (upstream's ratios and coefficients), for N frames at once."""
    exp = info["exp"].copy()
    dx = (bins_to_degrees(info["yaw"]) - float(bins_to_degrees(src["yaw"])[0])) * 0.26
    dy = (bins_to_degrees(info["pitch"]) - float(bins_to_degrees(src["pitch"])[0])) * 0.28
    right = dx > 0
    exp[:, 33] += dx * np.where(right, 0.0007, 0.001)
    exp[:, 45] += dx * np.where(right, 0.001, 0.0007)
    exp[:, 34] += dy * -0.001
    exp[:, 46] += dy * -0.001
    return exp


def _powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, and `limit` itself."""
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes) | {limit})


def _bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding n items (n itself beyond the largest)."""
    return next((b for b in buckets if b >= n), n)


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Pad dim 0 to `size` by repeating the last row (padded rows are computed and
    dropped; repeating real data keeps them numerically tame)."""
    extra = size - tensor.shape[0]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])])


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
        self.emitted = 0  # frames submitted for rendering
        self.handed_out = 0  # frames given to the caller
        self._queued: deque = deque()  # futures of submitted frames not yet handed out
        self.finished = False
        # Frame k is due at start + k / fps: the batchers serve the earliest due first.
        self.started = time.monotonic()
        self.fps = engine.fps

    def _frames(self, final: bool) -> Iterator[np.ndarray]:
        """Run every LMDM window the audio so far allows and hand out frames in order.

        A window's settled frames are queued for rendering as soon as it is sampled, so
        they render while the next window samples; frames already finished are handed out
        between windows, and the stream's very first frame is waited for there, so it
        leaves before the later windows of a long clip have sampled."""
        frames_known = len(self.pcm) // SAMPLES_PER_FRAME
        total = round(len(self.pcm) / SAMPLES_PER_FRAME) if final else frames_known
        seq = self.motion.seq_frames

        def window_ready(start: int) -> bool:
            return start < total and (final or start + seq + LOOKAHEAD <= frames_known)

        while True:
            start = self.motion.next_start()
            if not window_ready(start):
                break
            end = min(start + seq, total) if final else start + seq
            # Audio up to the window's end plus the encoder's look-ahead: the same slice
            # whatever the chunking, because a non-final window waits for all of it.
            pcm = self.pcm[: (end + LOOKAHEAD) * SAMPLES_PER_FRAME]
            feats = self.engine.audio_features(pcm, start, end)
            cond = self.engine.conditions(feats, self.avatar, start)  # (end-start, 1059)
            window_cond = self.motion.window_condition(cond, offset=start)
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.motion.windows)
            due = self.started + start / self.fps
            self.motion.add(
                self.engine.sample_window(self.motion.reference, window_cond, generator, due)
            )
            # Never past the audio: the last window runs beyond the clip's end.
            ready = min(self.motion.settled, total)
            if window_ready(self.motion.next_start()):
                # The next window samples right away: queue whole batches only and let the
                # rest join its frames (a lone stream would pad a short batch to full size).
                batch = self.engine.max_batch
                ready = max(self.emitted, ready - (ready - self.emitted) % batch)
            self._queue(ready)
            while self._queued and (self._queued[0].done() or self.handed_out == 0):
                yield self._next_queued()
        limit = min(total, self.motion.motion.shape[1]) if final else self.motion.settled
        self._queue(limit)
        while self._queued:
            yield self._next_queued()

    def _queue(self, limit: int) -> None:
        """Submit frames [emitted, limit) for rendering; their futures wait in `_queued`."""
        if self.emitted >= limit:
            return
        motion = self.motion.motion[0]
        x_d = self.engine.driving_keypoints(self.avatar, motion[self.emitted : limit], motion[0])
        due = [self.started + k / self.fps for k in range(self.emitted, limit)]
        self._queued.extend(
            self.engine.submit_frames(self.avatar, x_d, due, first_alone=self.emitted == 0)
        )
        self.emitted = limit

    def _next_queued(self) -> np.ndarray:
        frame = next(drain_futures([self._queued.popleft()], RESULT_TIMEOUT_S, "frame"))
        self.handed_out += 1
        return frame

    def push(self, pcm: np.ndarray) -> Iterator[np.ndarray]:
        """Add audio; the returned iterator does the work as it is read (windows, frames)
        and must be read to the end before the next push or finish."""
        if self.finished:
            raise EngineInputError("audio", "stream already finished")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self.pcm = np.concatenate([self.pcm, pcm])
        return self._frames(final=False)

    def finish(self) -> Iterator[np.ndarray]:
        self.finished = True
        return self._frames(final=True)


# ---------------------------------------------------------------------- image helpers


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise EngineInputError("image", "array must be (H, W, 3) uint8 RGB")
    _check_size(array.shape[1], array.shape[0])
    return np.ascontiguousarray(array)


def _check_size(width: int, height: int) -> None:
    if min(width, height) < 64 or max(width, height) > MAX_SIDE:
        raise EngineInputError("image", f"sides must be 64..{MAX_SIDE} px, got {width}x{height}")


def _decode_image(data: bytes, background: str) -> np.ndarray:
    """The shared portrait decoder (`engines/images.py`): any format Pillow opens."""
    return decode_image(data, background=background, check_size=_check_size).rgb


def _center_crop(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    h, w = rgb.shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    patch = torch.tensor(rgb[y0 : y0 + side, x0 : x0 + side]).permute(2, 0, 1)[None].float()
    patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)
    crop = patch[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return crop, (x0, y0, side)


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
