"""The cluster's config (`cluster.toml`): one typed object, validated once before any Ray
call, with errors that name the key.

Layout: a `[cluster]` table (the keys of `ClusterConfig`, below) and a `[node]` table that
is a whole avatard daemon config (`[node.daemon]`, `[node.engines]`,
`[node.engines.options.fake]`...; docs/config.md), given to the daemon of every node. The
node's own runtime directory and endpoint are set by the node replica and cannot be given.
"""

from __future__ import annotations

import math
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from avatard.daemon.config import ConfigError, load_config

# Keys a node replica sets itself (each node has a private daemon).
NODE_OWN_KEYS = ("daemon.runtime_dir", "daemon.endpoint")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Every `[cluster]` key with its default. Units are in the names (`_s` seconds,
    `_bytes` bytes). `node` is the avatard config of each node's daemon, as dotted tables
    (``{"daemon": {...}, "engines.options.fake": {...}}``)."""

    app_name: str = "avatard"
    # Ray Serve HTTP proxy; loopback by default (put a TLS proxy in front for the world).
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # GPUs each node replica reserves: a fraction shares one GPU between replicas.
    gpus_per_node: float = 1.0
    # Node replicas: fixed at `min_nodes` when it equals `max_nodes`, else autoscaled on
    # ongoing requests between them (`target_ongoing_requests` per replica).
    min_nodes: int = 1
    max_nodes: int = 1
    target_ongoing_requests: float = 4.0
    # Serve's autoscaling timings: how long the wish for more (fewer) nodes must hold
    # before a node is added (removed), over ongoing requests averaged this far back.
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 5.0
    # Requests one node replica may hold at once; 0: the daemon's slots, workers x
    # jobs_per_worker, plus as many again queued in the daemon.
    max_ongoing_per_node: int = 0
    ingress_replicas: int = 1
    # A custom Ray resource the ingress replicas need (""; none): give it to the head
    # node only, so a lost GPU node never takes the ingress with it.
    ingress_resource: str = ""
    max_ongoing_per_ingress: int = 1000
    # Request limits, checked at the ingress with a 4xx naming the key.
    max_body_bytes: int = 32 * 1024 * 1024
    max_text_chars: int = 100_000
    # Attempts per job across nodes (a node that died, drained or was busy costs one).
    max_attempts: int = 4
    # Every wait of the ingress on a node: the next event of a job, a transcript.
    event_timeout_s: float = 60.0
    # A live session's node sends a frame every 1/fps: this long without any event and
    # the ingress counts the node lost and moves the session.
    live_event_timeout_s: float = 5.0
    node_ready_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    routing_stats_period_s: float = 1.0
    health_check_period_s: float = 2.0
    # Finished idempotent responses kept for replays (per ingress replica).
    idempotency_cache_bytes: int = 256 * 1024 * 1024
    idempotency_ttl_s: float = 3600.0
    node: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, rule: str) -> ConfigError:
            return ConfigError(f"cluster.{key}", rule)

        if not self.gpus_per_node > 0 or (
            self.gpus_per_node > 1 and not float(self.gpus_per_node).is_integer()
        ):
            raise bad(
                "gpus_per_node",
                f"must be a fraction in (0, 1] or a whole number, got {self.gpus_per_node}",
            )
        if not 0 <= self.min_nodes <= self.max_nodes or self.max_nodes < 1:
            raise bad(
                "max_nodes",
                f"need 0 <= min_nodes <= max_nodes and max_nodes >= 1, "
                f"got min_nodes={self.min_nodes}, max_nodes={self.max_nodes}",
            )
        if not 1 <= self.http_port <= 65535:
            raise bad("http_port", f"must be 1..65535, got {self.http_port}")
        for key in (
            "target_ongoing_requests",
            "upscale_delay_s",
            "downscale_delay_s",
            "look_back_period_s",
            "event_timeout_s",
            "live_event_timeout_s",
            "node_ready_timeout_s",
            "drain_timeout_s",
            "routing_stats_period_s",
            "health_check_period_s",
            "idempotency_ttl_s",
        ):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise bad(key, f"must be a positive number of seconds, got {value}")
        for key, low in (
            ("max_body_bytes", 1024),
            ("max_text_chars", 1),
            ("max_attempts", 1),
            ("ingress_replicas", 1),
            ("max_ongoing_per_ingress", 1),
            ("max_ongoing_per_node", 0),
            ("idempotency_cache_bytes", 0),
        ):
            if getattr(self, key) < low:
                raise bad(key, f"must be >= {low}, got {getattr(self, key)}")
        given = [
            key for key in NODE_OWN_KEYS if key.partition(".")[2] in self.node.get("daemon", {})
        ]
        if given:
            raise ConfigError(
                f"node.{given[0]}",
                "each node's daemon has its own runtime "
                "directory and endpoint; this key cannot be set",
            )

    @property
    def autoscaling(self) -> bool:
        return self.max_nodes > self.min_nodes

    def node_slots(self) -> int:
        """Jobs one node's daemon runs at once: workers x jobs_per_worker (as its config
        says; avatard's defaults where it says nothing)."""
        daemon = self.node_daemon_config().daemon
        return daemon.workers * daemon.jobs_per_worker

    def max_ongoing(self) -> int:
        """Requests a node replica holds at once (Serve's `max_ongoing_requests`)."""
        return self.max_ongoing_per_node or 2 * self.node_slots()

    def text_limit(self) -> tuple[int, str]:
        """The longest `text` a render may have and where that limit is set: the nodes'
        TTS engine's own limit (its `max_text_chars` option; the fake's
        `tts_max_text_chars`, 0 for none), which the daemon applies, capped by
        `cluster.max_text_chars` and the protocol's `MAX_TEXT_CHARS`."""
        from avatard.engines.registry import parse_engine_options
        from avatard.ipc.protocol import MAX_TEXT_CHARS

        engines = self.node_daemon_config().engines
        name = engines.tts
        kinds = [k for k in ("avatar", "tts", "asr") if getattr(engines, k) == name]
        options = parse_engine_options("tts", name, engines.engine_options(name), kinds)
        limits = [(MAX_TEXT_CHARS, "the protocol's MAX_TEXT_CHARS")]
        limits.append((self.max_text_chars, "cluster.max_text_chars"))
        for option in ("max_text_chars", "tts_max_text_chars"):
            value = getattr(options, option, 0)
            if value:
                limits.append((value, f"node.engines.options.{name}.{option}"))
        return min(limits)

    def node_daemon_config(self) -> Any:
        """The node daemon's typed avatard config (`avatard.daemon.config.Config`). Raises
        `ConfigError` naming the key as ``node.<key>``."""
        with tempfile.TemporaryDirectory(prefix="avatard-cluster-") as folder:
            path = Path(folder) / "node.toml"
            path.write_text(toml_text(self.node))
            try:
                return load_config(str(path), {})
            except ConfigError as exc:
                raise ConfigError(f"node.{exc.key}", exc.reason) from None


def flatten_tables(table: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Nested TOML tables -> dotted section name -> its plain keys:
    ``{"engines": {"avatar": "fake", "options": {"fake": {"frame_ms": 5}}}}`` ->
    ``{"engines": {"avatar": "fake"}, "engines.options.fake": {"frame_ms": 5}}``."""
    out: dict[str, dict[str, Any]] = {}
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if prefix and plain:
        out[prefix] = plain
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten_tables(value, f"{prefix}.{key}" if prefix else key))
    return out


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """Dotted sections as TOML text (what `PrivateDaemon` writes, reused for checking)."""
    from avatard.daemon.private_daemon import _toml_text

    return _toml_text(sections)


def cluster_config(table: dict[str, Any]) -> ClusterConfig:
    """The typed config from a parsed `cluster.toml` (``{"cluster": {...}, "node": {...}}``).
    Raises `ConfigError` naming the key (an unknown one, a wrong type, a broken limit)."""
    unknown = sorted(set(table) - {"cluster", "node"})
    if unknown:
        raise ConfigError(unknown[0], "unknown table; cluster.toml has [cluster] and [node]")
    cluster = dict(table.get("cluster", {}))
    known = {f.name: f for f in fields(ClusterConfig) if f.name != "node"}
    for key, value in cluster.items():
        if key not in known:
            raise ConfigError(f"cluster.{key}", f"unknown key (known: {', '.join(known)})")
        default = known[key].default
        kind = type(default)
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool) != isinstance(default, bool):
            raise ConfigError(f"cluster.{key}", f"must be {kind.__name__}, got {value!r}")
    config = ClusterConfig(**cluster, node=flatten_tables(dict(table.get("node", {}))))
    config.node_daemon_config()  # the node's daemon config is checked here, once
    return config


def load_cluster_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> ClusterConfig:
    """`cluster.toml` at `path` (None: all defaults) with `overrides` (dotted keys such as
    ``cluster.min_nodes`` or ``node.daemon.workers``) applied. Raises `ConfigError`."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("file", f"cannot read {path}: {exc}") from None
    for key, value in (overrides or {}).items():
        *parents, last = key.split(".")
        target = table
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return cluster_config(table)
