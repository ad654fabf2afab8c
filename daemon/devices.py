"""Devices the workers run on, their free memory, and where the next worker goes.

The supervisor never imports torch: GPUs are found and measured through NVML
(nvidia-ml-py), CPU memory through psutil. Placement is pure logic over a list of
`DeviceInfo` so it can be tested with a simulated device list.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil

log = logging.getLogger("avatard.devices")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu" or "cuda:<nvml index>"
    index: int  # NVML index for GPUs, -1 for the CPU
    total_bytes: int
    free_bytes: int
    label: str = ""  # model name, for status

    @property
    def is_gpu(self) -> bool:
        return self.index >= 0


class _Nvml:
    """NVML, initialised once; absent (no driver, no GPU) means no GPUs."""

    def __init__(self) -> None:
        self.ok = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.ok = True
        except Exception as exc:  # no driver, no library: a CPU-only machine
            log.debug("NVML unavailable: %s", exc)

    def count(self) -> int:
        return self.nvml.nvmlDeviceGetCount() if self.ok else 0

    def info(self, index: int) -> DeviceInfo:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        name = self.nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode()
        return DeviceInfo(f"cuda:{index}", index, int(mem.total), int(mem.free), name)

    def driver_version(self) -> str:
        """The NVIDIA driver's version ("" without NVML)."""
        if not self.ok:
            return ""
        version = self.nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)

    def process_memory(self, pid: int) -> int:
        """Device memory used by `pid` on any GPU (0 when unknown)."""
        if not self.ok:
            return 0
        used = 0
        for i in range(self.count()):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:
                continue
            for proc in procs:
                if proc.pid == pid and proc.usedGpuMemory:
                    used += int(proc.usedGpuMemory)
        return used


_NVML: _Nvml | None = None


def nvml() -> _Nvml:
    global _NVML
    if _NVML is None:
        _NVML = _Nvml()
    return _NVML


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs of this machine as NVML sees them, for reports."""

    names: tuple[str, ...]  # model names, in NVML order (every GPU, visible or not)
    driver_version: str  # "" when there is no NVML (no driver, no GPU)


def gpu_inventory() -> GpuInventory:
    """Every GPU's model name and the driver version, through NVML (no torch). Empty names
    and "" on a machine without NVML; raises nothing for a missing driver."""
    lib = nvml()
    names = tuple(lib.info(i).label for i in range(lib.count())) if lib.ok else ()
    return GpuInventory(names, lib.driver_version() if names else "")


def visible_gpu_indices() -> list[int]:
    """NVML indices allowed by CUDA_VISIBLE_DEVICES (plain integer lists only)."""
    count = nvml().count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    indices = []
    for item in visible.split(","):
        item = item.strip()
        if item.isdigit() and int(item) < count:
            indices.append(int(item))
    return indices


def cpu_device() -> DeviceInfo:
    mem = psutil.virtual_memory()
    return DeviceInfo("cpu", -1, int(mem.total), int(mem.available), "cpu")


def discover(devices: str) -> list[DeviceInfo]:
    """The devices workers may use: `auto` (visible GPUs, else the CPU), `cpu`, or a comma
    list of GPU indices."""
    spec = devices.strip().lower()
    if spec == "cpu":
        return [cpu_device()]
    if spec == "auto":
        gpus = visible_gpu_indices()
        return [nvml().info(i) for i in gpus] if gpus else [cpu_device()]
    indices = [int(part) for part in spec.split(",") if part.strip()]
    available = nvml().count()
    missing = [i for i in indices if i >= available]
    if missing:
        raise ValueError(f"daemon.devices: GPU index {missing} not present ({available} GPUs)")
    return [nvml().info(i) for i in indices]


def refresh(device: DeviceInfo) -> DeviceInfo:
    return cpu_device() if not device.is_gpu else nvml().info(device.index)


def place(devices: list[DeviceInfo], workers_per_device: dict[str, int]) -> DeviceInfo:
    """The device for the next worker: the fewest workers first, then the most free
    memory, so workers spread over all GPUs and fill the emptiest one first."""
    if not devices:
        raise ValueError("no devices to place a worker on")
    return min(devices, key=lambda d: (workers_per_device.get(d.name, 0), -d.free_bytes, d.index))


def place_all(devices: list[DeviceInfo], count: int) -> list[DeviceInfo]:
    """The device of each of `count` workers, in worker order (`place` for each)."""
    per_device: dict[str, int] = {}
    placed = []
    for _ in range(count):
        device = place(devices, per_device)
        per_device[device.name] = per_device.get(device.name, 0) + 1
        placed.append(device)
    return placed


def has_room(device: DeviceInfo, needed_bytes: int) -> bool:
    """True when the device has the free memory the previous load used."""
    return device.free_bytes >= needed_bytes
