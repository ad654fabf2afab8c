"""avatard.daemon: the `avatard` command line, the config, the supervisor and its workers.

The public API below is what code outside this package (the benches in `avatard.bench`,
the tests, tools) may use; every other module and name here is internal and may change
without notice. `avatard.bench` imports nothing else from this package.

Config:
  `Config`, `ConfigError`     the typed, validated config and the error naming the bad key
  `load_config(path, overrides)`  TOML file + dotted-key overrides -> `Config`
  `parse_override("k=v")`     one ``--set KEY=VALUE`` item -> (key, TOML value)
  `resolved_runtime_dir(config)`, `resolved_endpoint(config)`
                              where a daemon with that config keeps its socket and lock,
                              and the endpoint its clients connect to
Processes:
  `PrivateDaemon`             start a private `avatard serve` in a work folder, wait for its
                              workers, read its status, stop it, list what it leaked
  `PrivateDaemonError`        it exited or gave up loading while the caller waited
Machine:
  `gpu_inventory()`, `GpuInventory`   the GPUs' names and the driver version, via NVML

Process memory (RSS) is `avatard.ipc.procmem.rss_bytes`; the runtime directory the
environment names is `avatard.ipc.paths.default_runtime_dir`.

The names load on first use (PEP 562), so `import avatard.daemon` stays as light as the
supervisor needs (no ZeroMQ, no engine), and `python -m avatard.daemon.<module>` runs
without a module imported twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import (
        Config,
        ConfigError,
        load_config,
        parse_override,
        resolved_endpoint,
        resolved_runtime_dir,
    )
    from .devices import GpuInventory, gpu_inventory
    from .private_daemon import PrivateDaemon, PrivateDaemonError

__all__ = [
    "Config",
    "ConfigError",
    "GpuInventory",
    "PrivateDaemon",
    "PrivateDaemonError",
    "gpu_inventory",
    "load_config",
    "parse_override",
    "resolved_endpoint",
    "resolved_runtime_dir",
]

# Public name -> the module of this package that defines it.
_HOMES = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "parse_override": "config",
    "resolved_endpoint": "config",
    "resolved_runtime_dir": "config",
    "GpuInventory": "devices",
    "gpu_inventory": "devices",
    "PrivateDaemon": "private_daemon",
    "PrivateDaemonError": "private_daemon",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
