"""DittoEngine: the Ditto talking-head pipeline behind the AvatarEngine interface.

Options: `DittoOptions` (options.py; the table is in docs/config.md): ``weights`` is
``"random"`` (seeded random weights of the official shapes, for benchmarking; every log
line and the report say RANDOM WEIGHTS) or the checkpoint folder holding
``ditto_pytorch/`` (networks and aux models) and ``ditto_cfg/``; the rest are quality and
speed switches. Those left unset whose best value depends on the device (batch sizes, CUDA
graphs, torch.compile) are resolved here, once the device is known.

What runs: registration (face detection, landmarks, the landmark-based crop; see
registration.py), source features once per avatar, HuBERT audio features, the condition
handler (conditions.py) on the cfg's template ``ch_info``, motion generation in
upstream's offline or online scheme (generator.py, motion_gen.py; the ``mode`` option or
`open_stream(..., mode=)`), motion clipping and stitching (pipeline.py: relative driving
motion scaled to the template, lips driven, scripted blinks, ``overall_ctrl_info``, gaze
fix; then the stitching network), keypoint transform, warp, decode and paste-back into
the source image. Per-frame work and LMDM windows go through batchers (batcher.py)
shared by every stream of the worker.

Random-weights mode has no aux models, HuBERT file or cfg: it registers with a centred
square crop and feeds zero audio features and zero control dims, which is enough to
measure the compute.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
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
    check_interruptible,
    no_progress,
)
from ..images import decode_image
from ..options import as_options
from . import checkpoints, conditions, networks, random_checkpoint, synthetic
from .batcher import Batcher, drain_futures
from .generator import Blinks, FeatureMotion
from .graphs import GraphedCall
from .keypoints import transform_keypoints
from .lmdm import LMDM, ddim_time_pairs
from .motion_gen import info_to_vector
from .networks import module_state_template
from .options import MODES, DittoOptions
from .pipeline import PipelineConfig, StitchSource, job_randint
from .pipeline import driving_keypoints as pipeline_driving_keypoints
from .registration import CROP_SIZE as FACE_SIZE
from .registration import PasteBack, Registrar, RegistrationError
from .serving import rewrite_for_serving

log = logging.getLogger("avatard.engines.ditto")

RANDOM_NOTE = "RANDOM WEIGHTS"
AUDIO_DIM = 1024
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
CROP_SIZE = 256
MAX_SIDE = 4096
HUBERT_CHUNK = (3, 5, 2)  # frames of left context, produced, look-ahead
LOOKAHEAD = HUBERT_CHUNK[2]
HUBERT_WINDOW = sum(HUBERT_CHUNK) * SAMPLES_PER_FRAME + 80  # 6480 samples per chunk
HUBERT_LEAD = HUBERT_WINDOW - (HUBERT_CHUNK[1] + HUBERT_CHUNK[2]) * SAMPLES_PER_FRAME  # 2000
RESULT_TIMEOUT_S = 300.0  # longest wait for one batched frame or window
# A live stream counts among the streams whose windows a round waits for (window_hold_ms)
# while it submitted one within this long: 1.5 online window periods (10 frames, 0.4 s at
# 25 fps), so a stream that closed stops being waited for after one round.
WINDOW_HOLDER_TTL_S = 0.6


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
    stitch_source: StitchSource | None = None  # the avatar's side of the motion stitch

    def __post_init__(self) -> None:
        if self.stitch_source is None:
            self.stitch_source = StitchSource.from_info(self.source_info)


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
        cuda = device.startswith("cuda")
        self.render_dtype = networks.DTYPES[resolve_dtype(opts.dtype, cuda)]
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
        self._setup_pipelines(opts)
        self.serving_layers = opts.serving_layers
        self.compiled = cuda and opts.compile is not False
        self._prepare_render_networks(cudnn_benchmark=cuda and opts.cudnn_benchmark)
        # Priority -1: ahead of the default stream's 0 (lower numbers run first).
        self._lmdm_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        self._warp_decode = GraphedCall("warp+decode", self._warp_decode_eager, self.cuda_graphs)
        self._ddim = GraphedCall("lmdm-ddim", self._ddim_eager, self.cuda_graphs)
        # Slots the device computed (batches padded up to a captured/compiled size), next
        # to the batchers' item counts: the share of padding is work thrown away.
        self._frame_slots = 0
        self._window_slots = 0
        self._frame_batcher: Batcher = Batcher(
            "frames", self._launch_render, self.max_batch, opts.batch_wait_ms / 1000,
            finish=self._finish_render,
        )
        self._window_batcher: Batcher = Batcher(
            "windows", self._sample_items, self.max_windows, opts.batch_wait_ms / 1000,
            hold_s=opts.window_hold_ms / 1000, holder_ttl_s=WINDOW_HOLDER_TTL_S,
        )
        if not self.random_weights:
            self._hubert = _open_hubert(Path(weights) / checkpoints.AUX_RELDIR, device)
            flags = conditions.handler_flags(self.cfg)
            # With a template (ch_info) upstream conditions on the template's eyes and
            # never reads the avatar's: registration then needs no mediapipe.
            eyes = (flags["use_eye_open"] or flags["use_eye_ball"]) and all(
                p.template is None for p in self.pipelines.values())
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

    def _setup_pipelines(self, opts: DittoOptions) -> None:
        """Upstream's setup settings per mode: the cfg's default_kwargs (nothing in random
        mode), the other mode's scheme where the cfg was written for one, and the options
        that override them. Keys we do not reproduce are warned about once, here."""
        overrides = {"sampling_timesteps": opts.sampling_timesteps}
        self.pipelines = {
            mode: PipelineConfig.from_cfg(self.cfg, mode, self.lmdm.seq_frames, overrides)
            for mode in MODES
        }
        self.mode = opts.mode
        pcfg = self.pipelines[self.mode]
        self.sampling_timesteps = pcfg.sampling_timesteps
        self.unhonoured = pcfg.unhonoured
        if self.unhonoured:
            log.warning("ditto cfg: default_kwargs keys not reproduced (upstream would act on "
                        "them): %s", ", ".join(self.unhonoured))
        for line in pcfg.describe_overrides():
            self._log(f"{self.mode} mode: option overrides the cfg: {line}")
        self._preroll: np.ndarray | None = None

    def pipeline(self, mode: str | None = None) -> PipelineConfig:
        return self.pipelines[mode or self.mode]

    def preroll_features(self, rows: int) -> np.ndarray:
        """Online mode's silence pre-roll: the features of `rows` frames of zero audio
        (upstream: `wav2feat` of rows x 640 zero samples), computed once."""
        if self._preroll is None or len(self._preroll) != rows:
            self._preroll = self.audio_features(
                np.zeros(rows * SAMPLES_PER_FRAME, np.float32), 0, rows)
        return self._preroll

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
            # Both modes' step counts: a live session (online) on a worker whose default
            # is offline must not pay a graph capture mid-stream.
            seq, dim = self.lmdm.seq_frames, self.lmdm.motion_feat_dim
            counts = {noise_steps(p.sampling_timesteps, self.lmdm.n_timestep)
                      for p in self.pipelines.values()}
            for count in sorted(counts):
                window = (
                    np.zeros(dim, np.float32),
                    np.zeros((seq, self.condition_dim), np.float32),
                    np.zeros((seq, dim), np.float32),
                    np.zeros((count, seq, dim), np.float32),
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
        for mode in MODES:
            pcfg = self.pipelines[mode]
            default = " (default)" if mode == self.mode else ""
            notes.append(f"{mode}{default}: {pcfg.sampling_timesteps} DDIM steps, overlap "
                         f"{pcfg.motion.overlap}")
            if mode == self.mode and pcfg.overrides:
                notes.append("options override the cfg: " + ", ".join(pcfg.describe_overrides()))
        if self.cfg is not None:
            pcfg = self.pipelines[self.mode]
            notes.append("template ch_info" if pcfg.template is not None
                         else "no ch_info: the avatar is its own template")
        if self.unhonoured:
            notes.append("cfg keys NOT reproduced: " + ", ".join(self.unhonoured))
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

    def counters(self) -> dict[str, float]:
        """How full the batches were since load: frame (warp + decode) and LMDM window
        batches run, the items they carried and the padding slots added to reach a
        captured size (`frame_buckets`, `window_buckets`); mean batch = items / batches,
        padding share = padded / (items + padded)."""
        frames, windows = self._frame_batcher, self._window_batcher
        return {"frame_batches": frames.batches, "frames": frames.items,
                "frames_padded": self._frame_slots, "window_batches": windows.batches,
                "windows": windows.items, "windows_padded": self._window_slots}

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

    def open_stream(self, state: AvatarState, seed: int, live: bool = False,
                    mode: str | None = None) -> DittoStream:
        """A job's stream; `mode` "offline" or "online" (default: the `mode` option). A
        live stream (`live=True`) always runs the online scheme (its 0.88 s look-ahead is
        the only one a realtime session can wait for); asking for a live offline stream
        raises EngineInputError("mode", ...)."""
        if not isinstance(state.payload, DittoAvatar):
            raise EngineInputError("avatar", "was not registered with the ditto engine")
        if mode is not None and mode not in MODES:
            raise EngineInputError("mode", f"must be one of {MODES}, got {mode!r}")
        if live and mode not in (None, "online"):
            raise EngineInputError("mode", f"a live stream runs online, not {mode!r}")
        mode = "online" if live else mode or self.mode
        return DittoStream(self, state.payload, int(seed), mode, live=bool(live))

    # ------------------------------------------------------------------ per-frame maths
    def audio_features(self, pcm: np.ndarray, start: int, end: int, base: int = 0
                       ) -> np.ndarray:
        """(end-start, 1024) features of frames [start, end) of a clip (16 kHz) of which
        `pcm` holds the samples from index `base` on (0, or at least `HUBERT_LEAD` samples
        before the first chunk read, so a long stream keeps only its recent audio)."""
        if self._hubert is None:
            # Random-weights mode has no HuBERT file: zero features (see report notes).
            return np.zeros((end - start, AUDIO_DIM), np.float32)
        return _hubert_features(self._hubert, pcm, start, end, base)

    @property
    def noise_steps(self) -> int:
        """Noise draws per DDIM run of the default mode after the initial one (every step
        but the last)."""
        return noise_steps(self.sampling_timesteps, self.lmdm.n_timestep)

    def sample_window(
        self,
        reference: np.ndarray,
        cond: np.ndarray,
        x_init: np.ndarray,
        step_noise: np.ndarray,
        deadline_s: float | None = None,
        holder: Hashable | None = None,
    ) -> np.ndarray:
        """One DDIM run of the LMDM: (265,) reference, (80,C) condition, (80,265) initial
        x and (S-1,80,265) per-step noise -> (80,265). The stream owns the randomness, so a
        window does not depend on which other streams' windows share its batch. `holder`
        (a live stream's key): the window may wait up to `window_hold_ms` for the windows
        of the other live streams of its round (`Batcher`, holders). Raises TimeoutError
        after RESULT_TIMEOUT_S without a result."""
        item = (np.asarray(reference, np.float32).reshape(-1), np.asarray(cond, np.float32),
                np.asarray(x_init, np.float32), np.asarray(step_noise, np.float32))
        deadline = [deadline_s] if deadline_s is not None else None
        future = self._window_batcher.submit([item], deadline, holder=holder)[0]
        return next(drain_futures([future], RESULT_TIMEOUT_S, "LMDM window"))

    def _ddim_eager(
        self, cond_frame: torch.Tensor, cond: torch.Tensor, x_init: torch.Tensor,
        noises: torch.Tensor,
    ) -> torch.Tensor:
        # The step count is in the noise's shape (one draw per step but the last), so
        # each count is its own graph and modes with different counts can share a batcher.
        steps = noises.shape[0] + 1
        return self.lmdm.ddim_sample(cond_frame, cond, steps, x_init=x_init, noises=list(noises))

    def _sample_items(self, items: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        """A batch of windows: (reference, cond, x_init, noises) each -> (80,265) each.

        On CUDA it runs on a stream of its own with high priority: the DDIM loop is
        hundreds of small kernels that leave most of the GPU idle, so they fit between
        the render batches' kernels instead of waiting behind them."""
        if self._lmdm_stream is None:
            return self._sample_on_current_stream(items)
        with torch.cuda.stream(self._lmdm_stream):
            return self._sample_on_current_stream(items)

    def _sample_on_current_stream(self, items: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        # Windows of streams in different modes may run different step counts: one DDIM
        # run per count.
        counts = sorted({item[3].shape[0] for item in items})
        if len(counts) == 1:
            return self._sample_group(items)
        out: list[np.ndarray | None] = [None] * len(items)
        for count in counts:
            index = [i for i, item in enumerate(items) if item[3].shape[0] == count]
            for i, window in zip(index, self._sample_group([items[i] for i in index]),
                                 strict=True):
                out[i] = window
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _sample_group(self, items: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        dev = self.device
        ref = torch.from_numpy(np.stack([i[0] for i in items])).to(dev)
        cond = torch.from_numpy(np.stack([i[1] for i in items])).to(dev)
        x_init = torch.from_numpy(np.stack([i[2] for i in items])).to(dev)
        noises = torch.from_numpy(np.stack([i[3] for i in items], axis=1)).to(dev)
        n = len(items)
        if self.cuda_graphs:
            bucket = _bucket(n, self.window_buckets)
            self._window_slots += bucket - n
            ref, cond, x_init = (_pad(t, bucket) for t in (ref, cond, x_init))
            noises = _pad(noises.transpose(0, 1), bucket).transpose(0, 1)
        return list(networks.to_numpy(self._ddim(ref, cond, x_init, noises)[:n]))

    def driving_keypoints(
        self, avatar: DittoAvatar, pcfg: PipelineConfig, motion: np.ndarray,
        d0: np.ndarray | None, blink_rows: np.ndarray | None,
    ) -> np.ndarray:
        """Motion stitch for an image source, N clipped frames at once (pipeline.py:
        relative motion scaled to the template, lips driven, scripted blinks, overall
        controls, gaze fix), then the stitching network. Returns x_d (N,21,3)."""
        source = avatar.stitch_source
        x_d = pipeline_driving_keypoints(pcfg, source, motion, d0, blink_rows)
        if not pcfg.flag_stitching or not len(x_d):
            return x_d
        return networks.stitch(self.models["stitch_network"],
                               np.repeat(source.x_s, len(x_d), axis=0), x_d)

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
            self._frame_slots += bucket - n
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


def resolve_dtype(name: str, cuda: bool) -> str:
    """The `dtype` option's value as a concrete dtype name: "auto" is float16 on CUDA
    (upstream's autocast dtype; measured in docs/ditto.md against bfloat16: equal
    throughput through the daemon, a tenth of the error on the vectors) and float32 on
    the CPU, where half-precision convolutions are slow."""
    if name == "auto":
        return "float16" if cuda else "float32"
    return name


def noise_steps(sampling_timesteps: int, n_timestep: int = 1000) -> int:
    """Per-step noise draws of a DDIM run: every step but the last."""
    return len(ddim_time_pairs(sampling_timesteps, n_timestep)) - 1


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
    """One job. Audio -> HuBERT features -> motion (generator.py: upstream's offline or
    online scheme) -> motion stitch -> frames.

    Features are computed as soon as the audio they need has arrived (a chunk of 5 frames
    needs the encoder's 2 frames of look-ahead) and fed to the motion generator in steps
    of one window's new frames, so windows run as audio arrives and frames render while
    the next window samples. Values do not depend on how the audio was chunked.

    Randomness is the job's own (seeded by `seed`, so a requeued job renders the same
    frames): the per-step DDIM noise is drawn once and reused for every window, each
    window draws its initial x (upstream's order), and blinks come from a python
    generator of the job's.

    A live stream (online mode) takes `interrupt()`: see its docstring for what a barge-in
    does to the audio, the feature rows and the motion."""

    def __init__(self, engine: DittoEngine, avatar: DittoAvatar, seed: int, mode: str,
                 live: bool = False):
        if live and mode != "online":
            raise ValueError(f"a live Ditto stream runs online, not {mode!r}")
        self.engine = engine
        self.avatar = avatar
        self.seed = seed
        self.mode = mode
        self.live = live
        self.pcfg = pcfg = engine.pipeline(mode)
        lmdm = engine.lmdm
        self._generator = torch.Generator().manual_seed(seed % 2**64)
        shape = (lmdm.seq_frames, lmdm.motion_feat_dim)
        self._step_noise = torch.randn(
            (noise_steps(pcfg.sampling_timesteps, lmdm.n_timestep), *shape),
            generator=self._generator,
        ).numpy()
        self._window_shape = shape
        self.blinks = Blinks(pcfg, job_randint(seed))
        if pcfg.template is not None:
            template, cond_source = pcfg.template.vector, pcfg.template.condition_source()
        else:
            template, cond_source = info_to_vector(avatar.source_info), avatar.cond_source
        preroll = engine.preroll_features(pcfg.motion.overlap) if pcfg.motion.online else None
        self.motion = FeatureMotion(pcfg, engine.cfg, cond_source, template, self._sample,
                                    preroll, engine.condition_dim)
        self.pcm = np.zeros(0, np.float32)  # the job's audio from sample `pcm_base` on
        self.pcm_base = 0
        self.samples = 0  # audio samples received
        self.features = 0  # feature rows fed to the motion generator
        self._motion: list[np.ndarray] = []  # clipped motion of frames not yet stitched
        self.motion_frames = 0  # frames of final motion received
        self.emitted = 0  # frames submitted for rendering
        self.handed_out = 0  # frames given to the caller
        self._queued: deque = deque()  # futures of submitted frames not yet handed out
        self._unread = False  # the iterator of the last push/finish is not read to its end
        self.finished = False
        # Frame k is due at start + k / fps: the batchers serve the earliest due first.
        self.started = time.monotonic()
        self.fps = engine.fps

    def _sample(self, reference: np.ndarray, cond: np.ndarray) -> np.ndarray:
        x_init = torch.randn(self._window_shape, generator=self._generator).numpy()
        due = self.started + self.emitted / self.fps
        # A live session's windows come in the same tick as the other sessions' (the
        # worker aligns their clocks) and wait for them; a batch stream's run at once.
        return self.engine.sample_window(reference, cond, x_init, self._step_noise, due,
                                         holder=id(self) if self.live else None)

    def _feature_limit(self, final: bool, total: int) -> int:
        """Feature rows whose values the audio so far fixes: whole chunks of 5 frames
        with the encoder's look-ahead behind them (all of them at the end)."""
        if final:
            return total
        mid = HUBERT_CHUNK[1]
        known = self.samples // SAMPLES_PER_FRAME - LOOKAHEAD
        return max(known - known % mid, self.features)

    def _frames(self, final: bool) -> Iterator[np.ndarray]:
        """Feed the features the audio allows, one window's worth at a time, queue the
        frames that became final and hand out finished ones in order; the stream's very
        first frame is waited for, so it leaves before later windows sample."""
        try:
            yield from self._make_frames(final)
        finally:
            self._unread = False

    def _make_frames(self, final: bool) -> Iterator[np.ndarray]:
        total = round(self.samples / SAMPLES_PER_FRAME) if final else None
        limit = self._feature_limit(final, total or 0)
        step = self.pcfg.motion.valid
        while self.features < limit:
            stop = min(self.features + step, limit)
            rows = self.engine.audio_features(self.pcm, self.features, stop, self.pcm_base)
            self.features = stop
            self._drop_old_audio()
            self._add_motion(self.motion.push(rows))
            more = self.features < limit
            self._queue(None, whole_batches=more)
            while self._queued and (self._queued[0].done() or self.handed_out == 0):
                yield self._next_queued()
        if final:
            self._add_motion(self.motion.finish(total))
        self._queue(total, whole_batches=False)
        while self._queued:
            yield self._next_queued()

    def _drop_old_audio(self) -> None:
        """Keep only the audio that later feature chunks read (a live session runs for
        hours): from `HUBERT_LEAD` samples before the chunk of the next feature row, or in
        a live stream of the first row an interrupt() would compute again."""
        first = self.features - self.features % HUBERT_CHUNK[1]
        if self.live:
            first = min(first, _first_row_reading(self.handed_out))
        keep_from = first * SAMPLES_PER_FRAME - HUBERT_LEAD
        if first and keep_from > self.pcm_base + 16 * HUBERT_WINDOW:  # not on every step
            self.pcm = self.pcm[keep_from - self.pcm_base :]
            self.pcm_base = keep_from

    def _add_motion(self, frames: np.ndarray) -> None:
        if len(frames):
            self._motion.append(frames)
            self.motion_frames += len(frames)

    def _queue(self, total: int | None, whole_batches: bool) -> None:
        """Stitch and submit the frames whose motion and blink row are known. With
        `whole_batches`, more windows follow at once: queue only whole render batches
        and let the rest join the next window's frames."""
        known = self.samples // SAMPLES_PER_FRAME
        ready = self.blinks.ready(self.motion_frames, known, total)
        if whole_batches:
            batch = self.engine.max_batch
            ready = max(self.emitted, ready - (ready - self.emitted) % batch)
        if ready <= self.emitted:
            return
        motion = np.concatenate(self._motion) if len(self._motion) > 1 else self._motion[0]
        count = ready - self.emitted
        rows = self.blinks.rows(self.emitted, ready, total)
        x_d = self.engine.driving_keypoints(self.avatar, self.pcfg, motion[:count],
                                            self.motion.d0, rows)
        self._motion = [motion[count:]] if count < len(motion) else []
        due = [self.started + k / self.fps for k in range(self.emitted, ready)]
        self._queued.extend(
            self.engine.submit_frames(self.avatar, x_d, due, first_alone=self.emitted == 0)
        )
        self.emitted = ready

    def _next_queued(self) -> np.ndarray:
        frame = next(drain_futures([self._queued.popleft()], RESULT_TIMEOUT_S, "frame"))
        self.handed_out += 1
        return frame

    def push(self, pcm: np.ndarray) -> Iterator[np.ndarray]:
        """Add audio; the returned iterator does the work as it is read (windows, frames)
        and must be read to the end before the next push, finish or interrupt."""
        if self.finished:
            raise EngineInputError("audio", "stream already finished")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self.pcm = np.concatenate([self.pcm, pcm])
        self.samples += len(pcm)
        self._unread = True
        return self._frames(final=False)

    def finish(self) -> Iterator[np.ndarray]:
        self.finished = True
        self._unread = True
        return self._frames(final=True)

    def set_due(self, start_s: float) -> None:
        """Frame k is due at `start_s + k / fps` (the live clock's start): the deadlines
        this stream's windows and frames carry into the batchers from now on."""
        self.started = float(start_s)

    @property
    def burst_frames(self) -> int:
        """Online: a window of `valid` (10) frames completes every `valid` pushes, in a
        pattern that also follows the encoder's chunks of HUBERT_CHUNK[1] rows, so it
        repeats every lcm of the two (10). Offline: every window step (70)."""
        motion = self.pcfg.motion
        return math.lcm(motion.valid, HUBERT_CHUNK[1]) if motion.online else motion.valid

    @property
    def lookahead_frames(self) -> int:
        """Frames of audio past frame k pushed before frame k leaves, audio pushed at most
        one frame per call (the live clock's cadence). Online: 21 (window j >= 1 reads the
        feature rows up to (j+1)*10, which the encoder gives once 2 more frames of audio
        are in, and outputs frames (j-1)*10 .. j*10-1; frame 0 leaves with the 22nd frame
        of audio, 0.88 s). Offline: 82 (a window every 70 frames, reading 80 rows, and
        the final smoothing's frame), or more where a scripted blink waits for the clip
        to run on past its guard (`Blinks.hold_frames`: 60..100 frames as upstream draws
        it). Pushes of more than 5 frames at once can hold an online window until the
        next chunk of features (upstream takes rows a window's worth at a time), so
        frames may then leave later."""
        motion = self.pcfg.motion
        mid = HUBERT_CHUNK[1]

        def audio_frames_for(rows: int) -> int:  # frames pushed until `rows` rows exist
            return -(-rows // mid) * mid + LOOKAHEAD

        if motion.online:
            # Window j >= 1 reads rows up to (j + 1) * valid and outputs frames from
            # (j - 1) * valid; the pattern repeats every `mid` windows.
            return max(audio_frames_for((j + 1) * motion.valid) - (j - 1) * motion.valid - 1
                       for j in range(1, mid + 1))
        # Window j reads rows up to j * valid + seq_frames; after it, frames before
        # (j + 1) * valid - 1 are final (the last settled one waits for the smoothing).
        windows = max(audio_frames_for(j * motion.valid + motion.seq_frames)
                      - max(j * motion.valid - 1, 0) - 1 for j in range(mid + 1))
        return max(windows, self.blinks.hold_frames)

    def interrupt(self) -> int:
        """Barge-in on a live stream (`AvatarStream.interrupt`). With F frames returned
        (all of them: push() hands out every frame it submits, so nothing is in the
        render batcher) and the audio pushed up to frame L:

        - the held 16 kHz audio from sample 640F on becomes zeros (the samples the
          encoder's look-ahead and the next chunks read);
        - every feature row already computed whose encoder chunk (3 + 5 + 2 frames) read
          any of those samples, from the chunk of row F - 6 on, is computed again from
          the silenced audio and replaces the row in the motion generator's buffer and
          its pending rows (`FeatureMotion.replace_features`), so the windows sampled
          from now on read the features of silence for every frame not returned (rows
          whose chunk holds only silenced audio are the pre-roll's silence rows);
        - the fused motion is kept: the last window's tail for frames F .. F+9 (sampled
          from speech) is cross-faded into the next window, conditioned on silence, with
          upstream's weights 0, 0.1 .. 0.9, and its reference frame stays; so the mouth
          closes over the next 10 frames as the model does when speech ends, without a
          cut in the pose. Blinks keep their schedule (by frame index).

        Frames F.. then equal those of the same stream fed zeros for the audio of
        frames F.. whenever the interrupt came before any window read a row made from that
        audio. Returns L + 1 - F (0 when no frame awaits its audio)."""
        check_interruptible(self, self.finished)
        if self._unread or self._queued or self._motion or self.emitted != self.handed_out:
            raise RuntimeError("interrupt() while frames of the last push() are not all "
                               "read: read its iterator to the end first")
        returned = self.handed_out
        affected = -(-self.samples // SAMPLES_PER_FRAME) - returned  # frames with audio
        if affected <= 0:
            return 0
        cut = returned * SAMPLES_PER_FRAME - self.pcm_base
        self.pcm = np.concatenate([self.pcm[:cut], np.zeros(len(self.pcm) - cut, np.float32)])
        first = _first_row_reading(returned)
        if first < self.features:
            rows = self.engine.audio_features(self.pcm, first, self.features, self.pcm_base)
            self.motion.replace_features(first, rows)
        return affected


def _first_row_reading(frame: int) -> int:
    """The first feature row whose encoder chunk reads audio of `frame` or later: chunk f
    (a multiple of 5) reads frames f-3 .. f+6 (and 80 samples before), so rows from the
    chunk of frame - 6 on."""
    mid, right = HUBERT_CHUNK[1], HUBERT_CHUNK[2]
    earliest = max(0, frame - (mid + right) + 1)
    return -(-earliest // mid) * mid


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


def _hubert_features(session, pcm: np.ndarray, start: int, end: int, base: int = 0
                     ) -> np.ndarray:
    """Frames [start, end) of the offline chunking of the streaming encoder: windows of
    6480 samples (3+5+2 frames of 40 ms plus 80 samples) every 5 frames from frame 0; of
    each window's 50 Hz outputs, the rows of the 5 produced frames are averaged in pairs
    to 25 fps. The clip starts with `HUBERT_LEAD` samples of silence; `pcm` holds its
    audio from sample `base` on; audio beyond `pcm` is zeros."""
    left, mid, right = HUBERT_CHUNK
    window = HUBERT_WINDOW
    lead = HUBERT_LEAD
    first = start - start % mid  # chunks are aligned to multiples of 5 frames
    if base and base > first * SAMPLES_PER_FRAME - lead:
        raise ValueError(f"audio from sample {base} cannot give frame {first}'s chunk")
    # padded[0] is clip sample `origin` (the silence before the clip when base is 0).
    origin = -lead if base == 0 else base
    padded = np.concatenate([np.zeros(lead if base == 0 else 0, np.float32),
                             pcm.astype(np.float32), np.zeros(window, np.float32)])
    input_name = session.get_inputs()[0].name
    out = []
    for i in range(first, end, mid):
        offset = i * SAMPLES_PER_FRAME - lead - origin
        chunk = padded[offset : offset + window]
        if len(chunk) < window:
            chunk = np.pad(chunk, (0, window - len(chunk)))
        encoding = session.run(None, {input_name: chunk.reshape(1, -1)})[0]
        encoding = encoding.reshape(-1, AUDIO_DIM)
        rows = encoding[-(mid + right) * 2 : -right * 2]
        out.append(rows.reshape(mid, 2, AUDIO_DIM).mean(axis=1))
    feats = np.concatenate(out, axis=0) if out else np.zeros((0, AUDIO_DIM), np.float32)
    return feats[start - first : end - first].astype(np.float32)
