"""Where a local daemon's files live: its runtime directory and the client socket in it.

One resolver for everyone: the daemon's config (`resolved_runtime_dir`, which puts
`daemon.runtime_dir` first), the client's default endpoint, and the private daemons that
`avatard render` and the benches start. Standard library only, so the config module (which
the supervisor imports first) stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "avatard.sock"  # the client socket, inside the runtime directory


def default_runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The runtime directory when config names none: $AVATARD_RUNTIME_DIR, else systemd's
    $RUNTIME_DIRECTORY (its first entry: systemd separates several with ':'), else
    $XDG_RUNTIME_DIR/avatard, else /tmp/avatard-<uid>.

    `environ`: the variables to read (default: this process's environment). Does not create
    the directory and raises nothing.
    """
    env = os.environ if environ is None else environ
    if env.get("AVATARD_RUNTIME_DIR"):
        return Path(env["AVATARD_RUNTIME_DIR"])
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "avatard"
    return Path(f"/tmp/avatard-{os.getuid()}")


def socket_endpoint(runtime_dir: Path) -> str:
    """The ipc:// endpoint of the client socket in `runtime_dir` (no check that it exists
    or that the path fits AF_UNIX; the daemon's config checks that)."""
    return f"ipc://{runtime_dir / SOCKET_NAME}"
