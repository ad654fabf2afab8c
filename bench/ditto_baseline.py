"""Side-by-side baseline of the upstream Ditto PyTorch networks and ours, with FLOP counts.

    python -m avatard.bench.ditto_baseline --upstream .upstream/ditto-talkinghead \\
        [--device cuda] [--json OUT] [--repeats N]
    avatard bench ditto --upstream .upstream/ditto-talkinghead ...

ALL WEIGHTS ARE RANDOM: the figures are speeds and FLOP counts, never image quality.

Upstream (antgroup/ditto-talkinghead) is read from a local copy of its sources: the
network modules under ``core/models/modules`` are imported one file at a time under a
private package name, so their package ``__init__`` (which imports every network at once)
is not run and no top-level name ``core`` is added. Each network is built with the
constructor arguments upstream's PyTorch loader uses: ``create_model`` in
``core/utils/load_model.py`` calls ``module(**kwargs)`` where the wrappers in
``core/models/*.py`` pass no network argument, i.e. the constructors' defaults, and the
LMDM gets ``motion_feat_dim``, ``audio_feat_dim`` and ``seq_frames`` from the pipeline
config (265, 1059, 80: our ``networks.DEFAULT_LMDM_CONFIG``). Weights: upstream's own
initialisation under a fixed seed, spectral-norm vectors settled by power iteration; the
same state_dict is then loaded into our network (the key layouts are identical), so both
sides compute on identical weights and their fp32 outputs can be compared. Without
``--upstream`` our networks get their own seeded initialisation.

Precision modes (both sides in each):
- ``fp32``: float32, TF32 off in cuDNN and cuBLAS.
- ``tf32``: float32 weights, TF32 on in cuDNN and cuBLAS.
- ``fp16``: float32 weights under ``torch.autocast(float16)``: how upstream's PyTorch
  wrappers run the extractors, the warp network and the decoder.
- ``bf16``: ours with bfloat16 weights (keypoints float32, stitching MLP float32), as our
  engine runs them; upstream under ``torch.autocast(bfloat16)`` (it has no bf16 path of
  its own). Ours is also timed with the decoder in channels_last, the engine's CUDA
  default.
In fp16 and bf16 modes TF32 is left at PyTorch's defaults (cuDNN on, cuBLAS off).
Upstream as shipped runs warp + decoder in fp16 autocast and the stitching MLP and LMDM
in fp32; our engine runs warp + decoder in bf16 (channels_last, CUDA graphs; graphs are
not used here) and the rest in fp32.

Timing: CUDA events around each call (wall clock on CPU), warm-up calls first, median of
the repeats; large batches and whole DDIM runs use half the repeats (at least 3).
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (nothing computed),
batch 1, for each side separately; it counts matmuls, convolutions and attention at 2 per
multiply-add, not elementwise ops, norms or grid sampling. Peak: median TFLOP/s of dense
square matmuls (8192 on CUDA) per dtype; achieved TFLOP/s = counted FLOPs / time, and the
FLOP bound on frames/s = peak / FLOPs per frame.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import platform
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from avatard.engines.ditto import checkpoints, networks

from .timing import time_calls

BANNER = (
    "#" * 78
    + "\n#  ALL WEIGHTS ARE RANDOM (seeded): benchmark only. Outputs are noise; the figures"
    + "\n#  are speeds and FLOP counts of the network shapes, not of a trained model."
    + "\n"
    + "#" * 78
)

UPSTREAM_ALIAS = "_avatard_ditto_upstream"
# Our network name -> (module file under core/models/modules, class name) upstream.
UPSTREAM_CLASSES = {
    "appearance_extractor": ("appearance_feature_extractor", "AppearanceFeatureExtractor"),
    "motion_extractor": ("motion_extractor", "MotionExtractor"),
    "warp_network": ("warping_network", "WarpingNetwork"),
    "decoder": ("spade_generator", "SPADEDecoder"),
    "stitch_network": ("stitching_network", "StitchingNetwork"),
    "lmdm": ("LMDM", "LMDM"),
}
NETWORKS = tuple(UPSTREAM_CLASSES)
SIDES = ("upstream", "ours")
LMDM_NEW_FRAMES = 70  # an 80-frame window overlaps the previous one by 10 frames


# ----------------------------------------------------------------------------- upstream


def einops_stand_in() -> dict[str, types.ModuleType]:
    """Modules standing in for ``einops`` when it is not installed: only the seven
    patterns the upstream LMDM uses, as the same views and copies."""

    def rearrange(t: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
        p = " ".join(pattern.split())
        if p == "b c -> b 1 c":
            return t.unsqueeze(1)
        if p == "b -> b 1 1":
            return t[:, None, None]
        if p == "b -> b 1":
            return t[:, None]
        if p == "b (r d) -> b r d":
            return t.unflatten(1, (sizes["r"], -1))
        if p == "... (d r) -> ... d r":
            return t.unflatten(-1, (-1, sizes["r"]))
        if p in ("... d r -> ... (d r)", "... r f -> ... (r f)"):
            return t.flatten(-2)
        raise NotImplementedError(f"einops stand-in: rearrange {pattern!r}")

    def repeat(t: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
        if " ".join(pattern.split()) == "... n -> ... (n r)":
            return t.repeat_interleave(sizes["r"], dim=-1)
        raise NotImplementedError(f"einops stand-in: repeat {pattern!r}")

    class Rearrange(nn.Module):
        def __init__(self, pattern: str, **sizes: int):
            super().__init__()
            self.pattern, self.sizes = pattern, sizes

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return rearrange(x, self.pattern, **self.sizes)

    root = types.ModuleType("einops")
    layers = types.ModuleType("einops.layers")
    layers_torch = types.ModuleType("einops.layers.torch")
    root.rearrange, root.repeat, root.__version__ = rearrange, repeat, "stand-in"
    layers_torch.Rearrange = Rearrange
    root.layers, layers.torch = layers, layers_torch
    return {"einops": root, "einops.layers": layers, "einops.layers.torch": layers_torch}


@dataclass
class Upstream:
    root: Path
    commit: str | None
    classes: dict[str, type] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "commit": self.commit,
            "imported": {name: self.files[name] for name in self.classes},
            "failed": self.failed,
            "notes": self.notes,
        }


def load_upstream(root: Path) -> Upstream:
    """Import upstream's six network classes from `root` (a copy of the repository)."""
    root = Path(root)
    modules_dir = root / "core" / "models" / "modules"
    if not modules_dir.is_dir():
        raise FileNotFoundError(f"{modules_dir} not found: pass the repository folder")
    commit_file = root / "UPSTREAM_COMMIT"
    commit = commit_file.read_text().strip() if commit_file.is_file() else None
    up = Upstream(root=root, commit=commit)
    try:
        import einops

        up.notes.append(f"einops {einops.__version__}")
    except ImportError:
        sys.modules.update(einops_stand_in())
        up.notes.append(
            "einops not installed: the LMDM's rearrange/repeat calls ran through a "
            "built-in stand-in (same views and copies, see einops_stand_in)"
        )
    # A package object without running core/models/modules/__init__.py; re-created when
    # a different folder is asked for.
    package = sys.modules.get(UPSTREAM_ALIAS)
    if package is None or list(getattr(package, "__path__", [])) != [str(modules_dir)]:
        for key in [k for k in sys.modules if k.split(".")[0] == UPSTREAM_ALIAS]:
            del sys.modules[key]
        package = types.ModuleType(UPSTREAM_ALIAS)
        package.__path__ = [str(modules_dir)]
        sys.modules[UPSTREAM_ALIAS] = package
    for name, (module_file, class_name) in UPSTREAM_CLASSES.items():
        up.files[name] = f"core/models/modules/{module_file}.py:{class_name}"
        try:
            module = importlib.import_module(f"{UPSTREAM_ALIAS}.{module_file}")
            up.classes[name] = getattr(module, class_name)
        except Exception as exc:  # report and go on with the other networks
            up.failed[name] = f"{type(exc).__name__}: {exc}"
    return up


def upstream_kwargs(name: str, device: str) -> dict[str, Any]:
    """Constructor arguments upstream's loader passes (see the module docstring). The LMDM
    also takes `device` (where its sampler draws noise): upstream leaves it at 'cuda'."""
    if name != "lmdm":
        return {}
    cfg = networks.DEFAULT_LMDM_CONFIG
    keys = ("motion_feat_dim", "audio_feat_dim", "seq_frames")
    return {**{k: cfg[k] for k in keys}, "device": device}


def upstream_weight_target(module: nn.Module) -> nn.Module:
    """The part whose state_dict upstream's checkpoint holds (LMDM: its `.model`)."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def clear_cached_tables(nets: dict[str, nn.Module]) -> int:
    """Empty upstream's per-instance caches (the LMDM's rotary tables, keyed by length
    only). CUDA autocast runs their ``einsum`` in 16 bits, and a table first computed
    under autocast would keep that precision in every later call (in fp32 mode too), so
    each precision mode starts from an empty cache. Returns the count."""
    count = 0
    for net in nets.values():
        for module in net.modules():
            cache = getattr(module, "cache", None)
            if isinstance(cache, dict):
                cache.clear()
                count += 1
    return count


# ----------------------------------------------------------------------------- weights


@torch.no_grad()
def settle_spectral_norms(module: nn.Module, seed: int, iterations: int = 30) -> int:
    """Set every ``weight_u``/``weight_v`` pair to power-iteration estimates of its
    ``weight_orig``'s leading singular vectors, as training leaves them (fresh ones are
    random or zero, which makes the normalised weights meaningless). Returns the count."""
    gen = torch.Generator().manual_seed(seed)
    buffers = dict(module.named_buffers())
    count = 0
    for name, weight in module.named_parameters():
        if not name.endswith("weight_orig"):
            continue
        prefix = name[: -len("weight_orig")]
        matrix = weight.detach().reshape(weight.shape[0], -1).float().cpu()
        left = F.normalize(torch.randn(matrix.shape[0], generator=gen), dim=0)
        right = F.normalize(matrix.t() @ left, dim=0)
        for _ in range(iterations):
            right = F.normalize(matrix.t() @ left, dim=0)
            left = F.normalize(matrix @ right, dim=0)
        buffers[prefix + "weight_u"].copy_(left)
        buffers[prefix + "weight_v"].copy_(right)
        count += 1
    return count


def build_networks(
    up: Upstream | None, device: str, seed: int, log: Callable[[str], None]
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(upstream, ours) float32 networks on `device` in eval mode with seeded random
    weights; ours carry upstream's weights where upstream was built."""
    theirs: dict[str, nn.Module] = {}
    ours: dict[str, nn.Module] = {}
    for i, name in enumerate(NETWORKS):
        torch.manual_seed(seed * 1000 + i)
        mine = networks.build_module(name)
        cls = up.classes.get(name) if up else None
        if cls is not None:
            module = cls(**upstream_kwargs(name, device)).eval()
            settle_spectral_norms(module, seed * 1000 + i)
            state = upstream_weight_target(module).state_dict()
            checkpoints.load_into(networks.weight_target(mine), state, f"upstream-random {name}")
            theirs[name] = module.to(device)
            source = "upstream init, shared"
        else:
            settle_spectral_norms(mine, seed * 1000 + i)
            source = "our init"
        ours[name] = networks.place(mine, device, torch.float32)
        log(f"  built {name}: random weights ({source})")
    return theirs, ours


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    image: torch.Tensor  # (1,3,256,256)
    kp_s: torch.Tensor  # (B,21,3)
    kp_d: torch.Tensor
    feature: torch.Tensor  # (B,32,16,64,64)
    warped: torch.Tensor  # (B,256,64,64), the decoder's input
    x: torch.Tensor  # (1,80,265) noisy motion window
    cond_frame: torch.Tensor  # (1,265)
    cond: torch.Tensor  # (1,80,1059)
    times: torch.Tensor  # (1,) long

    def to(self, dtype: torch.dtype) -> Inputs:
        """Everything but the keypoints and the step in `dtype` (how ours takes them)."""
        keep = {"kp_s", "kp_d", "times"}
        return Inputs(**{k: (v if k in keep else v.to(dtype)) for k, v in self.__dict__.items()})


def make_inputs(batch: int, device: str, seed: int) -> Inputs:
    cfg = networks.DEFAULT_LMDM_CONFIG
    frames, dim, audio = cfg["seq_frames"], cfg["motion_feat_dim"], cfg["audio_feat_dim"]
    if device == "meta":
        e = lambda *s: torch.empty(s, device="meta")  # noqa: E731
        kp = e(batch, 21, 3)
        return Inputs(
            e(1, 3, 256, 256),
            kp,
            kp,
            e(batch, 32, 16, 64, 64),
            e(batch, 256, 64, 64),
            e(1, frames, dim),
            e(1, dim),
            e(1, frames, audio),
            torch.full((1,), 500, dtype=torch.long, device="meta"),
        )
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, normal: bool = False) -> torch.Tensor:
        draw = torch.randn if normal else torch.rand
        return (draw(shape, generator=gen) * scale).to(device)

    kp_s = rand(batch, 21, 3, normal=True, scale=0.3)
    return Inputs(
        image=rand(1, 3, 256, 256),
        kp_s=kp_s,
        kp_d=kp_s + rand(batch, 21, 3, normal=True, scale=0.02),
        feature=rand(batch, 32, 16, 64, 64, normal=True),
        warped=rand(batch, 256, 64, 64, normal=True),
        x=rand(1, frames, dim, normal=True),
        cond_frame=rand(1, dim, normal=True, scale=0.5),
        cond=rand(1, frames, audio, normal=True),
        times=torch.full((1,), 500, dtype=torch.long, device=device),
    )


def calls(side: str, nets: dict[str, nn.Module], x: Inputs) -> dict[str, Callable[[], Any]]:
    """The timed (and counted) call of each network, batch as in `x`."""
    if side == "upstream":
        lmdm_step = lambda: nets["lmdm"](x.x, x.cond_frame, x.cond, x.times)  # noqa: E731
    else:
        lmdm_step = lambda: nets["lmdm"].predict(x.x, x.cond_frame, x.cond, x.times)  # noqa: E731
    return {
        "appearance_extractor": lambda: nets["appearance_extractor"](x.image),
        "motion_extractor": lambda: nets["motion_extractor"](x.image),
        "stitch_network": lambda: nets["stitch_network"](x.kp_s[:1], x.kp_d[:1]),
        "warp_network": lambda: nets["warp_network"](x.feature, x.kp_s, x.kp_d),
        "decoder": lambda: nets["decoder"](x.warped),
        "warp+decode": lambda: nets["decoder"](nets["warp_network"](x.feature, x.kp_s, x.kp_d)),
        "lmdm_step": lmdm_step,
    }


# ----------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# The networks each counted call needs.
REQUIRES = {
    "warp+decode": ("warp_network", "decoder"),
    "lmdm_step": ("lmdm",),
}


def _requires(key: str) -> tuple[str, ...]:
    return REQUIRES.get(key, (key,))


def flop_table(up: Upstream | None, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """FLOPs per call at batch 1 and parameter counts, both sides, on fresh meta-device
    instances (upstream's LMDM caches rotary tables per instance: kept apart)."""
    meta_inputs = make_inputs(1, "meta", 0)
    table: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        nets: dict[str, nn.Module] = {}
        for name in NETWORKS:
            if side == "ours":
                build = lambda n=name: networks.build_module(n)  # noqa: E731
            elif up is not None and name in up.classes:
                build = lambda n=name: up.classes[n](**upstream_kwargs(n, "meta"))  # noqa: E731
            else:
                continue
            try:
                with torch.device("meta"):
                    nets[name] = build().eval()
            except (RuntimeError, TypeError):  # a constructor reads values (upstream's)
                nets[name] = build().to("meta").eval()
        target = upstream_weight_target if side == "upstream" else networks.weight_target
        for key, fn in calls(side, nets, meta_inputs).items():
            if not all(n in nets for n in _requires(key)):
                continue
            with torch.no_grad():
                flops = count_flops(fn)
            row = table.setdefault(key, {})
            row[f"{side}_flops"] = flops
            row[f"{side}_params"] = sum(
                p.numel() for n in _requires(key) for p in target(nets[n]).parameters()
            )
    for key, row in table.items():
        a, b = row.get("upstream_flops"), row.get("ours_flops")
        row["rel_diff"] = (b - a) / a if a and b is not None else None
        parts = [
            f"{side} {row[f'{side}_flops'] / 1e9:.4f} GFLOP"
            for side in SIDES
            if f"{side}_flops" in row
        ]
        log(f"  {key:<22} " + ", ".join(parts))
    return table


# ----------------------------------------------------------------------------- timing


@contextlib.contextmanager
def tf32_flags(enabled: bool | None) -> Iterator[None]:
    """Set (True/False) or leave at PyTorch's defaults (None) TF32 in cuDNN and cuBLAS."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if enabled is None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass(frozen=True)
class Mode:
    name: str
    tf32: bool | None  # None: PyTorch's defaults
    upstream_autocast: torch.dtype | None
    ours_autocast: torch.dtype | None
    ours_dtype: torch.dtype
    peak_key: str
    note: str


MODES = {
    "fp32": Mode("fp32", False, None, None, torch.float32, "fp32", "float32, TF32 off"),
    "tf32": Mode("tf32", True, None, None, torch.float32, "tf32", "float32 weights, TF32 on"),
    "fp16": Mode(
        "fp16",
        None,
        torch.float16,
        torch.float16,
        torch.float32,
        "fp16",
        "both: float32 weights under autocast(float16) (upstream's inference mode)",
    ),
    "bf16": Mode(
        "bf16",
        None,
        torch.bfloat16,
        None,
        torch.bfloat16,
        "bf16",
        "ours: bfloat16 weights (our engine's mode); upstream: autocast(bfloat16)",
    ),
}
MODE_ORDER = ("fp32", "tf32", "fp16", "bf16")


def precision(mode: Mode, side: str, device: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(tf32_flags(mode.tf32))
    dtype = mode.upstream_autocast if side == "upstream" else mode.ours_autocast
    if dtype is not None:
        stack.enter_context(torch.autocast(device_type=device.split(":")[0], dtype=dtype))
    # Upstream's wrappers use no_grad; our engine uses inference_mode.
    stack.enter_context(torch.no_grad() if side == "upstream" else torch.inference_mode())
    return stack


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int, tf32: bool = False) -> float:
    """Median TFLOP/s of an n x n x n matmul in `dtype`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    inner = 1
    with tf32_flags(tf32):
        ms = time_calls(lambda: a @ b, device, repeats=1, warmup=2).median_ms
        inner = max(1, min(20, int(20 / max(ms, 1e-3))))  # ~20 ms per timed call

        def run() -> None:
            for _ in range(inner):
                torch.mm(a, b)

        ms = time_calls(run, device, repeats, warmup=1).median_ms
    return 2 * n**3 * inner / (ms / 1e3) / 1e12


def peaks(device: str, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if device.startswith("cuda"):
        n, repeats = 8192, (3 if quick else 10)
        plan = [
            ("bf16", torch.bfloat16, False),
            ("fp16", torch.float16, False),
            ("tf32", torch.float32, True),
            ("fp32", torch.float32, False),
        ]
    else:
        n, repeats = (1024 if quick else 2048), 3
        plan = [("fp32", torch.float32, False)]
    out["matmul_n"] = n
    for key, dtype, tf32 in plan:
        out[key] = round(matmul_peak(device, dtype, n, repeats, tf32), 2)
        log(f"  {key}: {out[key]} TFLOP/s ({n}x{n}x{n} matmul, median)")
    return out


def lmdm_ddim(side: str, lmdm: nn.Module, x: Inputs, steps: int, noise: dict) -> Callable:
    """One 80-frame window, DDIM from noise. Upstream draws its step noises once per step
    count (in `setup`) and the start noise per call; ours takes them pre-drawn on the
    device, as our engine passes them."""
    if side == "upstream":
        return lambda: lmdm.ddim_sample(x.cond_frame, x.cond, steps)
    x_init, noises = noise[steps]
    return lambda: lmdm.ddim_sample(x.cond_frame, x.cond, steps, x_init=x_init, noises=noises)


def rel_l2(a: Any, b: Any) -> float:
    def flat(v: Any) -> torch.Tensor:
        if isinstance(v, (tuple, list)):
            return torch.cat([flat(t) for t in v])
        return v.detach().float().cpu().flatten()

    fa, fb = flat(a), flat(b)
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- report


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            driver=_driver_version(),
        )
    else:
        info.update(
            device_name=platform.processor() or platform.machine(),
            driver=None,
            threads=torch.get_num_threads(),
        )
    return info


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            return out.strip().splitlines()[0]
        except Exception:
            return None
    return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gflop(flops: int | None) -> str:
    if flops is None:
        return "-"
    value = flops / 1e9
    return f"{value:.3f}" if value >= 1 else f"{value:.3g}"


def format_report(report: dict[str, Any]) -> str:
    """Markdown: header, FLOP table, side-by-side timing table, agreement."""
    info = report["environment"]
    lines = [
        "**ALL WEIGHTS ARE RANDOM: benchmark only.**",
        "",
        f"Device: {info.get('device_name')} ({info['device']}), driver {info.get('driver')}, "
        f"torch {info['torch']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}",
    ]
    up = report.get("upstream")
    if up:
        lines.append(
            f"Upstream: {up['root']} @ {up.get('commit') or 'unknown commit'}; "
            f"imported {', '.join(up['imported']) or 'nothing'}"
        )
        for name, why in up["failed"].items():
            lines.append(f"**Upstream {name} NOT imported: {why}**")
        lines += [f"Note: {n}" for n in up["notes"]]
    else:
        lines.append("Upstream: not given (our side only)")
    peak = report["peak_tflops"]
    lines.append(
        "Matmul peak (TFLOP/s, median): "
        + ", ".join(f"{k} {v}" for k, v in peak.items() if k != "matmul_n")
        + f" ({peak['matmul_n']}^3)"
    )
    lines += [
        "",
        "| network (batch 1) | upstream GFLOP | ours GFLOP | diff | "
        "upstream params | ours params |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in report["flops"].items():
        up_f, our_f = row.get("upstream_flops"), row.get("ours_flops")
        diff = row.get("rel_diff")
        lines.append(
            f"| {key} | {_gflop(up_f)} | {_gflop(our_f)} | "
            f"{'-' if diff is None else f'{diff * 100:+.4f} %'} | "
            f"{row.get('upstream_params', '-')} | {row.get('ours_params', '-')} |"
        )
    lines += [
        "",
        "| mode | network | batch | upstream ms/call | ours ms/call | upstream ms/frame | "
        "ours ms/frame | up/ours | upstream TFLOP/s (% peak) | ours TFLOP/s (% peak) | "
        "FLOP-bound frames/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, dict]] = {}
    for r in report["timing"]:
        rows.setdefault((r["mode"], r["network"], r["batch"]), {})[r["side"]] = r
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    for key in sorted(rows, key=lambda k: (order.get(k[0], 9), _net_order(k[1]), k[2])):
        pair = rows[key]
        u, o = pair.get("upstream", {}), pair.get("ours", {})

        def cell(r: dict, field_name: str, digits: int = 2) -> str:
            if r.get("skipped"):
                return "skipped"
            return _fmt(r.get(field_name), digits)

        def rate(r: dict) -> str:
            if not r or r.get("skipped") or r.get("tflops") is None:
                return "-"
            pct = r.get("pct_peak")
            return f"{r['tflops']:.3g} ({'-' if pct is None else f'{pct:.3g}'} %)"

        ratio = None
        if u.get("ms_per_call") and o.get("ms_per_call"):
            ratio = u["ms_per_call"] / o["ms_per_call"]
        bound = (u or o).get("flop_bound_fps")
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {cell(u, 'ms_per_call')} | "
            f"{cell(o, 'ms_per_call')} | {cell(u, 'ms_per_frame', 3)} | "
            f"{cell(o, 'ms_per_frame', 3)} | {_fmt(ratio)} | {rate(u)} | {rate(o)} | "
            f"{'-' if bound is None else f'{bound:.4g}'} |"
        )
    if report.get("agreement"):
        lines += ["", "fp32 agreement, ours vs upstream (relative L2, same weights and inputs):"]
        lines += [f"- {k}: {v:.3e}" for k, v in report["agreement"].items()]
    lines += ["", "**ALL WEIGHTS ARE RANDOM: benchmark only.**"]
    return "\n".join(lines)


def _net_order(name: str) -> int:
    base = name.split(" ")[0]
    names = [
        "appearance_extractor",
        "motion_extractor",
        "stitch_network",
        "lmdm_step",
        "lmdm_ddim",
        "warp_network",
        "decoder",
        "warp+decode",
    ]
    for i, n in enumerate(names):
        if base.startswith(n):
            return i
    return len(names)


# ----------------------------------------------------------------------------- main run


@dataclass
class Settings:
    device: str
    modes: list[str]
    batches: list[int]
    split_batches: list[int]
    lmdm_steps: list[int]
    warmup: int
    repeats: int
    seed: int
    quick: bool
    time_budget_s: float | None
    cudnn_benchmark: bool


class Runner:
    def __init__(
        self,
        settings: Settings,
        up: Upstream | None,
        log: Callable[[str], None],
        json_path: Path | None,
    ):
        self.s = settings
        self.up = up
        self.log = log
        self.json_path = json_path
        self.start = time.monotonic()
        self.report: dict[str, Any] = {
            "random_weights": True,
            "warning": "ALL WEIGHTS ARE RANDOM: benchmark only",
            "environment": device_info(settings.device),
            "settings": {
                **{k: v for k, v in settings.__dict__.items()},
                "modes_detail": {m: MODES[m].note for m in settings.modes},
            },
            "upstream": up.summary() if up else None,
            "peak_tflops": {},
            "flops": {},
            "timing": [],
            "agreement": {},
            "flop_bound_fps": {},
            "complete": False,
        }

    def save(self) -> None:
        if self.json_path:
            self.json_path.write_text(json.dumps(self.report, indent=1, default=str))

    def over_budget(self) -> bool:
        budget = self.s.time_budget_s
        return budget is not None and time.monotonic() - self.start > budget

    def flops_per_call(self, network: str, side: str) -> int | None:
        """Counted FLOPs of one call at batch 1 (a DDIM run: steps x one guided step)."""
        key = "lmdm_step" if network.startswith("lmdm") else network.split(" ")[0]
        row = self.report["flops"].get(key, {})
        flops = row.get(f"{side}_flops")
        if flops is None:
            return None
        if network.startswith("lmdm_ddim"):
            return flops * int(network.split("_")[-1])
        return flops

    def record(
        self,
        mode: Mode,
        network: str,
        batch: int,
        frames: int,
        side: str,
        fn: Callable[[], Any],
        light: bool = False,
    ) -> Any:
        row: dict[str, Any] = {
            "mode": mode.name,
            "network": network,
            "batch": batch,
            "frames_per_call": frames,
            "side": side,
        }
        self.report["timing"].append(row)
        if self.over_budget():
            row["skipped"] = "time budget"
            return None
        warmup, repeats = self.s.warmup, self.s.repeats
        if light:
            warmup, repeats = min(warmup, 1), max(3, repeats // 2) if repeats >= 3 else repeats
        cuda = self.s.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.s.device)
        try:
            with precision(mode, side, self.s.device):
                timed = time_calls(fn, self.s.device, repeats, warmup)
        except Exception as exc:  # e.g. out of memory at a large batch: report, go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            self.log(f"  {mode.name:<5} {network:<22} b{batch:<3} {side:<8} FAILED {row['error']}")
            if cuda:
                torch.cuda.empty_cache()
            return None
        ms = timed.median_ms
        per_call_flops = self.flops_per_call(network, side)
        if per_call_flops is not None and not network.startswith("lmdm"):
            per_call_flops *= batch
        row.update(
            ms_per_call=round(ms, 4),
            ms_per_frame=round(ms / frames, 5),
            frames_per_s=round(frames / (ms / 1e3), 2),
            ms_all=[round(t, 4) for t in timed.times_ms],
        )
        if cuda:
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.s.device) / 2**30, 2)
        peak = self.report["peak_tflops"].get(mode.peak_key)
        if per_call_flops:
            row["gflop_per_call"] = round(per_call_flops / 1e9, 4)
            row["tflops"] = round(per_call_flops / (ms / 1e3) / 1e12, 3)
            if peak:
                row["pct_peak"] = round(100 * row["tflops"] / peak, 2)
                row["flop_bound_fps"] = round(peak * 1e12 / (per_call_flops / frames), 2)
        self.log(
            f"  {mode.name:<5} {network:<22} b{batch:<3} {side:<8} {ms:10.3f} ms/call "
            f"{ms / frames:9.3f} ms/frame  {row.get('tflops', '-')} TFLOP/s"
        )
        return timed.output

    def run(self) -> dict[str, Any]:
        s, log = self.s, self.log
        if s.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = s.cudnn_benchmark
        log("FLOPs per call, batch 1 (meta tensors, FlopCounterMode):")
        self.report["flops"] = flop_table(self.up, log)
        self.save()
        log("matmul peak:")
        self.report["peak_tflops"] = peaks(s.device, s.quick, log)
        self.save()
        for mode_name in s.modes:
            peak = self.report["peak_tflops"].get(MODES[mode_name].peak_key)
            ppf = self.flops_per_call("warp+decode", "ours")
            if peak and ppf:
                self.report["flop_bound_fps"][mode_name] = {
                    "warp+decode": round(peak * 1e12 / ppf, 2),
                }
        log("building networks (random weights)")
        theirs, ours32 = build_networks(self.up, s.device, s.seed, log)
        sides = [side for side in SIDES if side == "ours" or theirs]
        # Modes run cheapest first so that a time budget cuts the slow float32 rows.
        run_order = [m for m in ("bf16", "fp16", "tf32", "fp32") if m in s.modes]
        for mode_name in run_order:
            mode = MODES[mode_name]
            log(f"mode {mode_name}: {mode.note}")
            clear_cached_tables(theirs)
            ours = ours32
            if mode.ours_dtype != torch.float32:
                ours = {
                    name: networks.place(copy.deepcopy(net), s.device, mode.ours_dtype)
                    for name, net in ours32.items()
                }
            nets = {"upstream": theirs, "ours": ours}
            self._per_window(mode, nets, sides)
            self._per_frame(mode, nets, sides)
            del ours
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self.save()
        self.report["complete"] = not any(r.get("skipped") for r in self.report["timing"])
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.save()
        return self.report

    def _outputs_to_compare(self, mode: Mode, batch: int) -> bool:
        return mode.name == "fp32" and batch == 1

    def _agree(self, key: str, outs: dict[str, Any]) -> None:
        if outs.get("upstream") is not None and outs.get("ours") is not None:
            self.report["agreement"][key] = rel_l2(outs["ours"], outs["upstream"])

    def _per_window(self, mode: Mode, nets: dict[str, dict], sides: list[str]) -> None:
        """Extractors, stitching, the LMDM: batch 1."""
        s = self.s
        base = make_inputs(1, s.device, s.seed + 1)
        inputs = {"upstream": base, "ours": base.to(mode.ours_dtype)}
        # Stitching stays float32 in our engine whatever the mode.
        fns = {side: calls(side, nets[side], inputs[side]) for side in sides}
        if "ours" in fns:
            fns["ours"]["stitch_network"] = calls("ours", nets["ours"], base)["stitch_network"]
        compare = self._outputs_to_compare(mode, 1)
        for key in ("appearance_extractor", "motion_extractor", "stitch_network", "lmdm_step"):
            outs = {side: self.record(mode, key, 1, 1, side, fns[side][key]) for side in sides}
            if compare:
                self._agree(key, outs)
        cfg = networks.DEFAULT_LMDM_CONFIG
        shape = (1, cfg["seq_frames"], cfg["motion_feat_dim"])
        for steps in s.lmdm_steps:
            noise: dict[int, tuple] = {}
            if "upstream" in sides:
                nets["upstream"]["lmdm"].setup(steps)
                up_noises = nets["upstream"]["lmdm"].noise_list
                noises = [n.to(mode.ours_dtype) for n in up_noises]
            else:
                gen = torch.Generator().manual_seed(s.seed + steps)
                noises = [
                    torch.randn(shape, generator=gen).to(s.device, mode.ours_dtype)
                    for _ in range(steps)
                ]
            x_init = torch.randn(shape, generator=torch.Generator().manual_seed(s.seed))
            noise[steps] = (x_init.to(s.device, mode.ours_dtype), noises)
            name = f"lmdm_ddim_{steps}"
            for side in sides:
                fn = lmdm_ddim(side, nets[side]["lmdm"], inputs[side], steps, noise)
                self.record(mode, name, 1, LMDM_NEW_FRAMES, side, fn, light=True)
            if mode.name == "fp32" and "upstream" in sides and not self.over_budget():
                self._ddim_agreement(nets, base, steps, shape)

    def _ddim_agreement(self, nets: dict, x: Inputs, steps: int, shape: tuple) -> None:
        """The same sampling run on both sides: upstream's start noise comes from the
        global generator, so it is re-seeded and the same draw made for ours."""
        s = self.s
        up_lmdm, our_lmdm = nets["upstream"]["lmdm"], nets["ours"]["lmdm"]
        mode = MODES["fp32"]
        with precision(mode, "upstream", s.device):
            torch.manual_seed(s.seed + 7)
            theirs = up_lmdm.ddim_sample(x.cond_frame, x.cond, steps)
        with precision(mode, "ours", s.device):
            torch.manual_seed(s.seed + 7)
            x_init = torch.randn(shape, device=s.device)
            mine = our_lmdm.ddim_sample(
                x.cond_frame, x.cond, steps, x_init=x_init, noises=up_lmdm.noise_list
            )
        self.report["agreement"][f"lmdm_ddim_{steps}"] = rel_l2(mine, theirs)

    def _per_frame(self, mode: Mode, nets: dict[str, dict], sides: list[str]) -> None:
        s = self.s
        for batch in s.batches:
            base = make_inputs(batch, s.device, s.seed + 100 + batch)
            inputs = {"upstream": base, "ours": base.to(mode.ours_dtype)}
            fns = {side: calls(side, nets[side], inputs[side]) for side in sides}
            compare = self._outputs_to_compare(mode, batch)
            keys = ["warp+decode"]
            if batch in s.split_batches:
                keys = ["warp_network", "decoder", "warp+decode"]
            light = batch >= 8
            for key in keys:
                outs = {
                    side: self.record(mode, key, batch, batch, side, fns[side][key], light=light)
                    for side in sides
                }
                if compare:
                    self._agree(key, outs)
                del outs
            if mode.name == "bf16" and s.device.startswith("cuda"):
                # Our engine's CUDA layout: the decoder's weights in channels_last.
                decoder_cl = copy.deepcopy(nets["ours"]["decoder"]).to(
                    memory_format=torch.channels_last
                )
                fn = calls("ours", {**nets["ours"], "decoder": decoder_cl}, inputs["ours"])
                self.record(
                    mode, "warp+decode chlast", batch, batch, "ours", fn["warp+decode"], light=light
                )
                del decoder_cl, fn
            del base, inputs, fns
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m avatard.bench.ditto_baseline",
        description="Upstream Ditto vs our networks: timing and FLOPs (RANDOM weights).",
    )
    parser.add_argument(
        "--upstream",
        type=Path,
        default=None,
        help="copy of antgroup/ditto-talkinghead (omit: our side only)",
    )
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 2)")
    parser.add_argument("--batches", default=None, help="warp+decode batches (1,8,16,32)")
    parser.add_argument(
        "--split-batches",
        default=None,
        help="batches also timed as warp and decoder apart (default: the smallest and largest)",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help="comma list of fp32,tf32,fp16,bf16 (CUDA default: all; CPU: fp32)",
    )
    parser.add_argument("--lmdm-steps", default=None, help="DDIM step counts (10,50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; rows after it are recorded as skipped",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark on (both sides; default off "
        "as upstream and our engine leave it)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 1, fp32 only on CPU, 0 warm-up, 1 repeat, "
        "LMDM 2 steps, no separate warp/decoder rows",
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if args.quick:
        defaults = dict(
            batches="1",
            modes="bf16,fp16,tf32,fp32" if cuda else "fp32",
            steps="2",
            warmup=0,
            repeats=1,
            split="",
        )
    else:
        defaults = dict(
            batches="1,8,16,32",
            modes="fp32,tf32,fp16,bf16" if cuda else "fp32",
            steps="10,50",
            warmup=2,
            repeats=10,
            split=None,
        )
    batches = parse_ints(args.batches or defaults["batches"])
    modes = [m.strip() for m in (args.modes or defaults["modes"]).split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}: choose from {list(MODES)}")
    if args.split_batches is not None:
        split = parse_ints(args.split_batches)
    elif defaults["split"] is not None:
        split = parse_ints(defaults["split"])
    else:
        split = sorted({min(batches), max(batches)})
    return Settings(
        device=device,
        modes=modes,
        batches=batches,
        split_batches=split,
        lmdm_steps=parse_ints(args.lmdm_steps or defaults["steps"]),
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        repeats=defaults["repeats"] if args.repeats is None else max(1, args.repeats),
        seed=args.seed,
        quick=args.quick,
        time_budget_s=args.time_budget,
        cudnn_benchmark=args.cudnn_benchmark,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)

    def log(line: str) -> None:
        print(line, flush=True)

    log(BANNER)
    up = None
    if args.upstream is not None:
        up = load_upstream(args.upstream)
        log(
            f"upstream {up.root} ({up.commit or 'commit unknown'}): imported "
            + ", ".join(f"{n} <- {up.files[n]}" for n in up.classes)
        )
        for name, why in up.failed.items():
            log(f"!!! upstream {name} could NOT be imported: {why}")
        for note in up.notes:
            log(f"note: {note}")
    runner = Runner(settings, up, log, args.json)
    info = runner.report["environment"]
    log(
        f"device {info['device']} {info.get('device_name')} driver {info.get('driver')} "
        f"torch {info['torch']}"
    )
    report = runner.run()
    log("")
    log(format_report(report))
    if args.json:
        log(f"wrote {args.json}")
    log(BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
