"""The daemon's configuration: one typed, frozen object built once at start.

Sources, lowest precedence first: the defaults declared on the dataclasses below, a TOML
file, then command-line overrides given as dotted keys (``{"daemon.workers": 4}``). The
merged values are validated in one pass; the first problem raises `ConfigError` naming the
dotted key and the rule it broke, so an operator can fix the file without reading code.

Every key carries its documentation in its field metadata. `config_reference_markdown()`
renders that into the table in docs/config.md, and a test compares the two so the docs
cannot drift from the code.

This module runs in the supervisor, which must stay light: stdlib only, plus the engine
table of `avatard.engines.registry` (which imports no engine), while a config is loaded
the engines' options classes (modules that import no engine runtime either), and the
runtime-dir resolver of `avatard.ipc.paths` (stdlib only).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatard.engines.options import EngineOptionError, RequiredOptionError
from avatard.engines.registry import ENGINES, check_engine_options
from avatard.ipc.paths import default_runtime_dir, socket_endpoint

__all__ = [
    "AF_UNIX_PATH_MAX_BYTES",
    "EXIT_CONFIG_ERROR",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "EnginesConfig",
    "AvatarsConfig",
    "RestartConfig",
    "RingsConfig",
    "TimeoutsConfig",
    "ENGINE_FLAG_HELP",
    "all_keys",
    "config_reference_markdown",
    "engine_flag_overrides",
    "load_config",
    "parse_override",
    "resolved_devices",
    "resolved_endpoint",
    "resolved_runtime_dir",
]

# sun_path of struct sockaddr_un holds 108 bytes on Linux, one of which is the final NUL.
AF_UNIX_PATH_MAX_BYTES = 107
LOG_LEVELS = ("debug", "info", "warning", "error")
# Exit status for an invalid configuration (sysexits.h EX_CONFIG). The systemd unit lists it
# in RestartPreventExitStatus= so a bad config fails the unit instead of restart-looping.
EXIT_CONFIG_ERROR = 78
MIB = 1024 * 1024


class ConfigError(ValueError):
    """A config value that cannot be used. `key` is the dotted key ("daemon.workers"),
    empty when the problem is the file itself (missing, or not valid TOML)."""

    def __init__(self, key: str, reason: str, source: str = ""):
        self.key = key
        self.reason = reason
        self.source = source  # where the value came from: a file path or "command line"
        message = f"{key}: {reason}" if key else reason
        if source:
            message = f"{message} (from {source})"
        super().__init__(message)


# ---------------------------------------------------------------------------- schema


def _key(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field: its default, its one-line meaning and its range rules."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """`[daemon]`: the supervisor process and its client-facing sockets."""

    endpoint: str = _key(
        "",
        "ZeroMQ endpoint clients connect to; empty means `ipc://<runtime_dir>/avatard.sock`.",
    )
    tcp_endpoint: str = _key(
        "",
        "Extra TCP endpoint such as `tcp://127.0.0.1:7780`; empty means no TCP listener.",
    )
    curve_secret_key_file: str = _key(
        "",
        "The daemon's CURVE secret key file (made by zmq.auth.create_certificates). With "
        "`curve_clients_dir` it makes every tcp:// endpoint require authenticated clients; "
        "binding TCP to a non-loopback address requires both.",
    )
    curve_clients_dir: str = _key(
        "",
        "Directory of the public key files (*.key) of the clients allowed over tcp://.",
    )
    runtime_dir: str = _key(
        "",
        "Directory for the socket and run files; empty means $AVATARD_RUNTIME_DIR, else "
        "$RUNTIME_DIRECTORY (systemd), else $XDG_RUNTIME_DIR/avatard, else "
        "/tmp/avatard-<uid>.",
    )
    workers: int = _key(1, "Worker processes to run (each loads its own engines).", ge=1)
    jobs_per_worker: int = _key(
        1,
        "Jobs one worker runs at the same time, each in its own thread, so an engine can "
        "batch the frames of several streams; calls into an engine that is not thread-safe "
        "are serialised (one job at a time inside that engine).",
        ge=1,
        le=64,
    )
    min_ready: int = _key(
        1,
        "Workers that must be ready before the daemon reports READY; at most `workers`.",
        ge=1,
    )
    max_parallel_loads: int = _key(
        1,
        "Workers allowed to load models at the same time (limits peak RAM and disk reads).",
        ge=1,
    )
    devices: str = _key(
        "auto",
        'Devices workers are spread over: "auto" (every visible CUDA GPU, else CPU), '
        '"cpu", or GPU indices such as "0,1".',
    )
    queue_size: int = _key(64, "Jobs that may wait for a worker before new ones are refused.", ge=1)
    job_deadline_s: float = _key(
        600.0, "Longest a job may take from acceptance to its last frame.", gt=0
    )
    live_render_ahead_frames: int = _key(
        -1,
        "Frames a live session renders ahead of its clock beyond the engine's look-ahead: "
        "slack for compute time, so a frame (or a burst: Ditto computes 10 at once) is "
        "ready when its tick comes. Each frame adds 1 / fps to the audio-to-frame latency. "
        "-1: 0 for an engine that makes a frame per push (its frame is made within the "
        "tick), half a burst + 1 for one that makes bursts (Ditto online: 6).",
        ge=-1, le=250,
    )
    live_max_queued_s: float = _key(
        600.0,
        "Most speech a live session may have queued and not yet played, in seconds (the "
        "client's audio plus its text's TTS audio, as the worker reports it in each "
        "heartbeat): more live_audio or live_text is refused `busy` until it plays. A "
        "worker holds it as float32 at the engine's rate (38 MB for 600 s at 16 kHz).",
        gt=0, le=86400,
    )
    max_media_s: float = _key(
        600.0,
        "Longest audio input of one lipsync or transcribe job, in seconds. Audio larger "
        "than one payload streams in chunks; the daemon holds a job's whole input (float32: "
        "4 bytes x sample rate x seconds, 115 MB for 30 min at 16 kHz) in memory until the "
        "job ends, so it can resend it to another worker after a crash. A longer input also "
        "needs `job_deadline_s` above RTF x length.",
        gt=0, le=86400,
    )
    streamed_input_bytes: int = _key(
        1 << 30,
        "Memory the daemon may hold for streamed audio inputs of all jobs together; a chunk "
        "beyond it fails its job with `no_space`.",
        ge=1 << 20,
    )
    drain_timeout_s: float = _key(
        30.0,
        "On stop, how long running jobs may finish before workers are terminated.",
        ge=0,
    )
    metrics_port: int = _key(
        0, "Port of the Prometheus metrics HTTP endpoint; 0 turns it off.", ge=0, le=65535
    )
    metrics_host: str = _key("127.0.0.1", "Address the metrics endpoint listens on.")
    log_level: str = _key("info", "Least severe log level written.", choices=LOG_LEVELS)


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """`[timeouts]`: how long each step may take before the supervisor gives up on it."""

    hello_s: float = _key(30.0, "A started worker must say hello within this time.", gt=0)
    load_s: float = _key(600.0, "A worker must finish loading its engines within this time.", gt=0)
    warmup_s: float = _key(120.0, "A worker must finish its warm-up call within this time.", gt=0)
    heartbeat_interval_s: float = _key(
        1.0, "How often a worker sends a heartbeat; below `heartbeat_timeout_s`.", gt=0
    )
    heartbeat_timeout_s: float = _key(
        10.0, "A worker silent for this long is declared dead and killed.", gt=0
    )
    stall_timeout_s: float = _key(
        30.0, "A job that makes no progress for this long is declared stalled and its "
        "worker replaced: no frame (render jobs), no piece of its audio transcribed (at most "
        "30 s of audio each: transcribe jobs), not counting time spent waiting on a full ring "
        "or on streamed input.", gt=0
    )
    kill_grace_s: float = _key(
        5.0, "Time between SIGTERM and SIGKILL when a worker is stopped.", ge=0
    )
    client_call_s: float = _key(
        30.0,
        "Longest a local client may hold a frame or audio slot before the daemon takes it "
        "back and stops the client's jobs (`timeout`).",
        gt=0,
    )
    park_unread_s: float = _key(
        2.0,
        "A speak or lipsync job whose client has read nothing for this long (every slot of "
        "its ring full: a stopped or stuck reader) gives its worker up when jobs of other "
        "clients wait for one: it waits at the back of the queue and resumes where its "
        "client is, every frame once. A client that reads, however slowly, is never parked.",
        gt=0,
    )
    session_idle_s: float = _key(
        300.0,
        "A client session with no message and no job for this long is closed and its input "
        "ring unlinked (a client that died without saying bye); the client says hello again.",
        gt=0,
    )
    input_gap_s: float = _key(
        30.0,
        "Longest wait for the next chunk of a streamed audio input (a job sent with "
        "`more`); past it the job fails with `timeout`.",
        gt=0,
    )
    vanished_check_s: float = _key(
        0.5,
        "How often the daemon checks that the processes of its local clients still run; a "
        "client that exited (even SIGKILLed) has its jobs cancelled at the next check, so it "
        "never holds a worker. Slow clients that are alive are not affected.",
        gt=0, le=60,
    )
    tcp_heartbeat_timeout_s: float = _key(
        10.0,
        "A tcp client whose connection brings nothing for this long, not even the answers "
        "to the ZMTP heartbeats the daemon sends every fifth of it, is dropped and its jobs "
        "cancelled (a host that vanished without closing the connection). A client that "
        "closes its connection, or whose process dies, is dropped at once. Slow clients "
        "are not affected: their ZeroMQ library answers heartbeats whether or not the "
        "program reads.",
        gt=0, le=3600,
    )


@dataclass(frozen=True, slots=True)
class RestartConfig:
    """`[restart]`: how failed loads, crashed workers and failed jobs are retried."""

    max_load_attempts: int = _key(
        3, "Load attempts per worker slot before the slot is given up as failed.", ge=1
    )
    backoff_initial_s: float = _key(1.0, "Wait before the first restart of a crashed worker.", ge=0)
    backoff_max_s: float = _key(
        60.0, "Longest wait between restarts; at least `backoff_initial_s`.", ge=0
    )
    backoff_factor: float = _key(
        2.0, "Each further restart waits this many times longer than the previous.", ge=1
    )
    crash_loop_window_s: float = _key(
        60.0,
        "A worker that crashes again within this time of its last start counts as "
        "crash-looping and its backoff grows.",
        gt=0,
    )
    max_job_attempts: int = _key(
        2, "Times a job is run (first run included) when its worker dies under it; a live "
        "session moves to another worker at most this many times less one.", ge=1
    )


@dataclass(frozen=True, slots=True)
class RingsConfig:
    """`[rings]`: the shared-memory rings that carry client input in and frames and audio
    out. Every page of a ring is reserved in /dev/shm when the ring is made (see "Shared
    memory" below for what a daemon and each session take)."""

    frame_slots: int = _key(
        8,
        "Frames one frame ring holds (a worker's, and each local session's per worker and "
        "lane); at least 2 so writer and reader overlap.",
        ge=2,
    )
    frame_slot_bytes: int = _key(
        512 * 512 * 3,
        "Bytes of one frame slot: the largest frame (H x W x 3) a worker may send. The "
        "default fits 512 x 512 (the embedded engine, the fake one, Ditto with the default "
        "portrait); Ditto renders at a registered portrait's own size, up to 1920 px a "
        "side, so raise it for those (1920 x 1080: 6220800) and /dev/shm with it; a portrait "
        "whose frames are larger is refused at registration, `too_large` naming this key.",
        ge=1024,
    )
    audio_slots: int = _key(
        4, "Audio chunks one output audio ring holds; at least 2 so writer and reader overlap.",
        ge=2,
    )
    audio_slot_bytes: int = _key(
        256 * 1024,
        "Bytes of one output audio slot (float32 samples, so a multiple of 4): the speech "
        "sent with frames; a longer sentence goes out as several chunks (256 KiB: 3 s at "
        "22.05 kHz).",
        ge=1024,
    )
    input_slots: int = _key(
        4,
        "Inputs (audio, image files) one local session's input ring holds: its jobs that "
        "may hold input at once.",
        ge=1,
    )
    input_slot_bytes: int = _key(
        1 * MIB,
        "Bytes of one slot of a local session's input ring (a multiple of 4): larger images "
        "travel inline through the socket into the daemon's inline ring; longer audio "
        "streams in chunks of this size (1 MiB: 16.4 s of 16 kHz audio).",
        ge=1024,
    )
    inline_slots: int = _key(
        2,
        "Inputs the daemon's one inline input ring holds (remote clients' inputs, and local "
        "ones too large for their session's slots): inline jobs that may hold input at once.",
        ge=1,
    )
    inline_slot_bytes: int = _key(
        8 * MIB,
        "Bytes of one inline input slot (a multiple of 4): the largest image file any client "
        "may send, and the largest chunk of audio an inline client sends at once (longer "
        "audio streams in chunks; `daemon.max_media_s` limits its length).",
        ge=1024,
    )


@dataclass(frozen=True, slots=True)
class AvatarsConfig:
    """`[avatars]`: how many registered portraits are kept, by the daemon and by workers.
    Past a bound the least recently used one goes (its /dev/shm segment is unlinked); a
    job that names it gets `not_found` and the client registers it again."""

    max_count: int = _key(
        64, "Portraits the daemon keeps (each in a /dev/shm segment of the file's size).", ge=1
    )
    max_bytes: int = _key(
        16 * MIB,
        "Bytes of image files the daemon keeps in /dev/shm at most, all portraits together.",
        ge=1024,
    )
    worker_cache_size: int = _key(
        8,
        "Portraits whose engine state each worker keeps (a few MiB each for real engines); "
        "the engines' own `cache_size` options bound their caches the same way.",
        ge=1,
    )


@dataclass(frozen=True, slots=True)
class EnginesConfig:
    """`[engines]`: which engine of each kind workers load, and their options."""

    avatar: str = _key("embedded", "Avatar (talking-head) engine, a name from the registry.")
    tts: str = _key("embedded", "Text-to-speech engine, a name from the registry.")
    asr: str = _key("embedded", "Speech-recognition engine, a name from the registry.")
    options: dict[str, dict[str, Any]] = _key(
        doc="Per-engine option tables, `[engines.options.<engine-name>]`, shared by every "
        "engine of that name; checked against the engines' options (see Engine options).",
        default_factory=dict,
    )

    def engine_options(self, name: str) -> dict[str, Any]:
        """A private copy of engine `name`'s options (empty when it has none)."""
        return _deep_copy_table(self.options.get(name, {}))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Build it with `load_config`."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    rings: RingsConfig = field(default_factory=RingsConfig)
    avatars: AvatarsConfig = field(default_factory=AvatarsConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dicts, e.g. to log the effective configuration at start."""
        return dataclasses.asdict(self)


# Section name -> dataclass, in the order the docs list them.
SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig,
    "timeouts": TimeoutsConfig,
    "restart": RestartConfig,
    "rings": RingsConfig,
    "avatars": AvatarsConfig,
    "engines": EnginesConfig,
}
# Keys whose value is a table checked by other rules (engine options: by the registry).
FREE_FORM_KEYS = frozenset({"engines.options"})


def _field_types(cls: type) -> dict[str, Any]:
    # Annotations are strings (postponed evaluation); resolve them once per class.
    return typing.get_type_hints(cls)


def all_keys() -> list[str]:
    """Every dotted key this config accepts (free-form tables as one key)."""
    return [
        f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    ]


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read TOML file `path` (None: defaults only), apply `overrides` (dotted keys, they
    beat the file), validate everything and return the frozen config."""
    raw: dict[str, Any] = {}
    file_source = ""
    if path is not None:
        file_source = str(path)
        raw = _read_toml(Path(path))

    override_keys: set[str] = set()
    for dotted, value in (overrides or {}).items():
        _apply_override(raw, dotted, value)
        override_keys.add(dotted)

    def source_of(key: str) -> str:
        # The value came from the command line if it, or a table above it, was overridden.
        for dotted in override_keys:
            if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
                return "command line"
        return file_source

    try:
        return _build_config(raw)
    except ConfigError as exc:
        if exc.source:
            raise
        raise ConfigError(exc.key, exc.reason, source_of(exc.key)) from None
    except (OverflowError, RecursionError, ValueError) as exc:
        # A 400-digit number for a float key, tables nested past the stack: still a
        # config error the operator can act on, never a traceback.
        raise ConfigError("(config)", f"cannot be read: {type(exc).__name__}: {exc}",
                          file_source) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a command-line override ``"daemon.workers=4"`` into ``("daemon.workers", 4)``.

    The value is read as a TOML value (so 4 is an int, 1.5 a float, true a bool, [1, 3] an
    array and "x" a string); a value that is not valid TOML is taken as a bare string, so
    ``engines.avatar=fake`` works without quotes.
    """
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "override must look like key=value, e.g. daemon.workers=4")
    value_text = value_text.strip()
    try:
        value = tomllib.loads(f"value = {value_text}")["value"]
    except tomllib.TOMLDecodeError:
        value = value_text
    except (RecursionError, ValueError) as exc:  # 3000 '[' or a 5000-digit integer
        raise ConfigError(key, f"value cannot be read: {type(exc).__name__}") from None
    return key, value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError("", f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError("", f"config file {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message ends with "(at line L, column C)".
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path} is not valid UTF-8: {exc}") from None
    except (RecursionError, ValueError) as exc:  # nesting past the stack, huge integers
        raise ConfigError("", f"{path} cannot be read: {type(exc).__name__}") from None


def _apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in the nested dict `raw`, creating tables on the way."""
    parts = dotted.split(".")
    if any(not part for part in parts):
        raise ConfigError(dotted, "override key has an empty part", "command line")
    table = raw
    for depth, part in enumerate(parts[:-1]):
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(where, f"expected table, got {_type_name(child)}", "command line")
        table = child
    # Copy tables given as values so later overrides never edit the caller's dict.
    table[parts[-1]] = _deep_copy_table(value) if isinstance(value, dict) else value


def _build_config(raw: dict[str, Any]) -> Config:
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(name, _unknown_key_reason(name, list(SECTIONS)))
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, f"expected table, got {_type_name(table)}")
        sections[section] = _build_section(section, cls, table)
    config = Config(**sections)
    _check_cross_field_rules(config)
    return config


def _build_section(section: str, cls: type, table: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = _field_types(cls)
    for name in table:
        if name not in fields:
            raise ConfigError(f"{section}.{name}", _unknown_key_reason(name, list(fields), section))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in table:
            continue  # the dataclass default applies
        key = f"{section}.{name}"
        values[name] = _check_value(key, table[name], types[name], f.metadata)
    instance = cls(**values)
    _check_section_rules(section, instance)
    return instance


def _check_value(key: str, value: Any, expected: Any, rules: Any) -> Any:
    """Type- and range-check one value; return it converted (int -> float where a float is
    expected)."""
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected bool, got {_type_name(value)}")
    elif expected is int:
        # bool is a subclass of int in Python, but `workers = true` is a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected int, got {_type_name(value)}")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected float, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, "must be a finite number")
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected str, got {_type_name(value)}")
    elif typing.get_origin(expected) is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected table, got {_type_name(value)}")
        return _deep_copy_table(value)
    else:  # pragma: no cover - a field type this checker was not taught
        raise TypeError(f"{key}: unsupported config type {expected!r}")

    if rules.get("ge") is not None and value < rules["ge"]:
        raise ConfigError(key, f"must be >= {_format_number(rules['ge'], key)}, got {value!r}")
    if rules.get("gt") is not None and value <= rules["gt"]:
        raise ConfigError(key, f"must be > {_format_number(rules['gt'], key)}, got {value!r}")
    if rules.get("le") is not None and value > rules["le"]:
        raise ConfigError(key, f"must be <= {_format_number(rules['le'], key)}, got {value!r}")
    if rules.get("choices") is not None and value not in rules["choices"]:
        reason = f"must be one of {', '.join(rules['choices'])}, got {value!r}"
        close = difflib.get_close_matches(str(value).lower(), rules["choices"], n=1)
        if close:
            reason += f" (did you mean {close[0]}?)"
        raise ConfigError(key, reason)
    return value


def _check_section_rules(section: str, values: Any) -> None:
    """Rules of single keys that a range cannot express."""
    if section == "daemon":
        _check_endpoint("daemon.endpoint", values.endpoint, ("ipc://", "tcp://"))
        _check_endpoint("daemon.tcp_endpoint", values.tcp_endpoint, ("tcp://",))
        if values.runtime_dir and not Path(values.runtime_dir).expanduser().is_absolute():
            raise ConfigError("daemon.runtime_dir", "must be an absolute path")
        _parse_devices(values.devices)
        if not values.metrics_host:
            raise ConfigError("daemon.metrics_host", "must not be empty")
    elif section == "rings":
        for name in ("audio_slot_bytes", "input_slot_bytes", "inline_slot_bytes"):
            if getattr(values, name) % 4:
                raise ConfigError(
                    f"rings.{name}",
                    f"must be a multiple of 4 (float32 samples), got {getattr(values, name)}",
                )
    elif section == "engines":
        for kind in ("avatar", "tts", "asr"):
            name = getattr(values, kind)
            known = sorted(ENGINES[kind])
            if name not in known:
                raise ConfigError(
                    f"engines.{kind}",
                    f"unknown {kind} engine {name!r} (known: {', '.join(known)})"
                    + _did_you_mean(name, known),
                )
        every_engine_name = sorted({name for table in ENGINES.values() for name in table})
        for name, options in values.options.items():
            key = f"engines.options.{name}"
            if name not in every_engine_name:
                raise ConfigError(
                    key,
                    f"unknown engine name (known: {', '.join(every_engine_name)})"
                    + _did_you_mean(name, every_engine_name),
                )
            if not isinstance(options, dict):
                raise ConfigError(key, f"expected table, got {_type_name(options)}")
        _check_engine_options(values)


# Engine options that `avatard serve` also sets with a flag of its own (daemon/cli.py), so
# a missing one can be named by the flag an operator is most likely to use.
OPTION_FLAGS: dict[str, tuple[str, ...]] = {
    "engines.options.ditto.weights": ("with avatard serve --checkpoints DIR (or --weights "
                                      "random)",),
}


def _check_engine_options(engines: EnginesConfig) -> None:
    """Check every options table against the options classes of the engines of its name
    (torch-free: only the classes' own modules are imported), and the required options of
    every configured engine, so a typo fails here and not in a worker's load."""
    configured = {kind: getattr(engines, kind) for kind in ("avatar", "tts", "asr")}
    for name in sorted(set(configured.values()) | set(engines.options)):
        kinds = [kind for kind, chosen in configured.items() if chosen == name]
        try:
            check_engine_options(name, engines.options.get(name, {}), kinds)
        except RequiredOptionError as exc:
            # The registry names the config table; the command line is this package's.
            places = [f"on the command line with --set {exc.key}=VALUE",
                      *OPTION_FLAGS.get(exc.key, ())]
            raise ConfigError(exc.key, exc.with_places(*places).reason) from None
        except EngineOptionError as exc:
            raise ConfigError(exc.key, exc.reason) from None


LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


def tcp_host(endpoint: str) -> str:
    """The host part of tcp://HOST:PORT (brackets kept for IPv6)."""
    return endpoint.removeprefix("tcp://").rsplit(":", 1)[0]


def is_loopback_endpoint(endpoint: str) -> bool:
    return tcp_host(endpoint).startswith(LOOPBACK_HOSTS)


def _check_cross_field_rules(config: Config) -> None:
    daemon, timeouts, restart = config.daemon, config.timeouts, config.restart
    curve = (daemon.curve_secret_key_file, daemon.curve_clients_dir)
    if any(curve) and not all(curve):
        missing = "curve_clients_dir" if daemon.curve_secret_key_file else "curve_secret_key_file"
        raise ConfigError(f"daemon.{missing}", "must be set too: CURVE needs the daemon's "
                          "secret key file and the directory of allowed client keys")
    for key in ("endpoint", "tcp_endpoint"):
        endpoint = getattr(daemon, key)
        if endpoint.startswith("tcp://") and not is_loopback_endpoint(endpoint) and not all(curve):
            raise ConfigError(f"daemon.{key}", f"binding {endpoint} (not loopback) requires "
                              "CURVE: set daemon.curve_secret_key_file and "
                              "daemon.curve_clients_dir")
    if daemon.curve_secret_key_file and not Path(daemon.curve_secret_key_file).is_file():
        raise ConfigError("daemon.curve_secret_key_file",
                          f"no such file: {daemon.curve_secret_key_file}")
    if daemon.curve_clients_dir and not Path(daemon.curve_clients_dir).is_dir():
        raise ConfigError("daemon.curve_clients_dir",
                          f"no such directory: {daemon.curve_clients_dir}")
    if daemon.min_ready > daemon.workers:
        raise ConfigError(
            "daemon.min_ready",
            f"must be <= daemon.workers ({daemon.workers}), got {daemon.min_ready}",
        )
    if restart.backoff_initial_s > restart.backoff_max_s:
        raise ConfigError(
            "restart.backoff_initial_s",
            f"must be <= restart.backoff_max_s ({restart.backoff_max_s:g}), "
            f"got {restart.backoff_initial_s:g}",
        )
    if timeouts.heartbeat_interval_s >= timeouts.heartbeat_timeout_s:
        raise ConfigError(
            "timeouts.heartbeat_interval_s",
            f"must be < timeouts.heartbeat_timeout_s ({timeouts.heartbeat_timeout_s:g}), "
            f"got {timeouts.heartbeat_interval_s:g}",
        )


def _check_endpoint(key: str, endpoint: str, schemes: tuple[str, ...]) -> None:
    if not endpoint:
        return
    if not endpoint.startswith(schemes):
        raise ConfigError(key, f"must start with {' or '.join(schemes)}, got {endpoint!r}")
    if endpoint.startswith("ipc://"):
        _check_ipc_path(key, endpoint.removeprefix("ipc://"))
    else:
        host, colon, port = endpoint.removeprefix("tcp://").rpartition(":")
        if not colon or not host or not (port.isdigit() and 0 < int(port) <= 65535):
            raise ConfigError(key, f"must look like tcp://HOST:PORT, got {endpoint!r}")


def _check_ipc_path(key: str, path: str) -> None:
    if not path:
        raise ConfigError(key, "ipc:// endpoint needs a path")
    size_bytes = len(os.fsencode(path))
    # An abstract-namespace name ("ipc://@name") has the same size limit.
    if size_bytes > AF_UNIX_PATH_MAX_BYTES:
        raise ConfigError(
            key,
            f"socket path {path!r} is {size_bytes} bytes, over the {AF_UNIX_PATH_MAX_BYTES}-byte "
            "limit of AF_UNIX addresses; choose a shorter daemon.runtime_dir",
        )


def _parse_devices(devices: str) -> list[str] | None:
    """Validate `daemon.devices`; None means "auto"."""
    text = devices.strip().lower()
    if text == "auto":
        return None
    if text == "cpu":
        return ["cpu"]
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise ConfigError(
                "daemon.devices",
                f'must be "auto", "cpu" or GPU indices like "0,1", got {devices!r}',
            )
        if int(part) in indices:
            raise ConfigError("daemon.devices", f"GPU {part} is listed twice")
        indices.append(int(part))
    return [f"cuda:{index}" for index in indices]


# ---------------------------------------------------------------------------- resolution


def resolved_runtime_dir(config: Config, environ: Mapping[str, str] | None = None) -> Path:
    """Where the socket and run files live: `daemon.runtime_dir`, else the environment's
    choice (`avatard.ipc.paths.default_runtime_dir`, the one the client reads too).
    `environ`: the variables to read (default: this process's environment). Does not
    create the directory."""
    if config.daemon.runtime_dir:
        return Path(config.daemon.runtime_dir).expanduser()
    return default_runtime_dir(environ)


# `--engine` means the same for every command that takes it (serve, and the private daemon
# of render, lipsync, transcribe, voices): one text, one function.
ENGINE_FLAG_HELP = (
    "Avatar engine (sets engines.avatar), e.g. fake, embedded, ditto. `fake` also makes "
    "the TTS and ASR engines fake (engines.tts, engines.asr), so nothing needs a model, "
    "unless --set names those keys.")


def engine_flag_overrides(engine: str, given_keys: Collection[str] = ()) -> dict[str, str]:
    """The config overrides `--engine ENGINE` stands for: `engines.avatar`; for `fake`,
    also `engines.tts` and `engines.asr` = fake unless `given_keys` (dotted keys the
    caller overrides already, e.g. with --set) names them."""
    overrides = {"engines.avatar": engine}
    if engine == "fake":  # the fault-injection engine comes with fake speech
        for key in ("engines.tts", "engines.asr"):
            if key not in given_keys:
                overrides[key] = "fake"
    return overrides


def resolved_endpoint(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The endpoint clients connect to: `daemon.endpoint`, else an ipc:// socket in the
    runtime directory. Raises ConfigError if that socket path is too long for AF_UNIX."""
    if config.daemon.endpoint:
        return config.daemon.endpoint
    endpoint = socket_endpoint(resolved_runtime_dir(config, environ))
    _check_ipc_path("daemon.runtime_dir", endpoint.removeprefix("ipc://"))
    return endpoint


def resolved_devices(config: Config, visible_gpu_count: int) -> list[str]:
    """Device strings for workers ("cpu", "cuda:0", ...). The caller counts visible GPUs
    (e.g. with NVML) so this module needs no GPU library. Worker i should use entry
    i % len(result)."""
    explicit = _parse_devices(config.daemon.devices)
    if explicit is None:
        if visible_gpu_count > 0:
            return [f"cuda:{index}" for index in range(visible_gpu_count)]
        return ["cpu"]
    return explicit


# ---------------------------------------------------------------------------- helpers


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _format_number(number: float, key: str = "") -> str:
    """A bound as people write it: whole numbers in full (1048576, never 1.04858e+06), a
    size key's also in binary units ("1048576 (1 MiB)"), others as short as exact."""
    if number != int(number):
        return repr(float(number))
    text = str(int(number))
    if key.endswith("_bytes") and number >= 1024:
        text += f" ({_binary_size(int(number))})"
    return text


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key_reason(name: str, candidates: list[str], section: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {f'{section}.' if section else ''}{close[0]}?)"
    # A key put in the wrong section: `workers` under [timeouts] is daemon.workers.
    elsewhere = [key for key in all_keys() if key.rsplit(".", 1)[1] == name]
    if elsewhere:
        return f"unknown key (did you mean {elsewhere[0]}?)"
    if section:
        return f"unknown key (keys of [{section}]: {', '.join(candidates)})"
    return f"unknown key (sections: {', '.join(candidates)})"


def _deep_copy_table(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deep_copy_table(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy_table(item) for item in value]
    return value


# ---------------------------------------------------------------------------- docs

DOCS_BEGIN = "<!-- BEGIN GENERATED: config_reference_markdown() -->"
DOCS_END = "<!-- END GENERATED -->"


def _format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float):
        return f"`{value!r}`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{value}`"


def _format_type(expected: Any) -> str:
    if typing.get_origin(expected) is dict:
        return "table"
    return expected.__name__


def _format_rule(rules: Any, key: str) -> str:
    parts: list[str] = []
    if rules.get("ge") is not None:
        parts.append(f">= {_format_number(rules['ge'], key)}")
    if rules.get("gt") is not None:
        parts.append(f"> {_format_number(rules['gt'], key)}")
    if rules.get("le") is not None:
        parts.append(f"<= {_format_number(rules['le'], key)}")
    if rules.get("choices") is not None:
        parts.append("one of " + ", ".join(rules["choices"]))
    return "; ".join(parts) or "-"


def _binary_size(nbytes: int) -> str:
    """1048576 -> "1 MiB", 786432 -> "768 KiB": for the docs' default column."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{nbytes} B"


def config_reference_markdown() -> str:
    """The key reference of docs/config.md, rendered from the dataclasses above."""
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        lines.append(f"### `[{section}]`")
        lines.append("")
        summary = " ".join((cls.__doc__ or "").split()).split(": ", 1)[-1]
        lines.append(summary[:1].upper() + summary[1:])
        lines.append("")
        lines.append("| Key | Type | Default | Range | Meaning |")
        lines.append("| --- | --- | --- | --- | --- |")
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default_text = _format_default(default)
            if key.endswith("_bytes") and isinstance(default, int) and default >= 1024:
                default_text += f" ({_binary_size(default)})"
            cells = [
                f"`{key}`",
                _format_type(types[f.name]),
                default_text,
                _format_rule(f.metadata, key),
                f.metadata["doc"].replace("|", "\\|"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _main() -> None:
    """`python -m avatard.daemon.config [FILE]`: print the key reference, or check FILE."""
    import sys

    if len(sys.argv) > 1:
        try:
            config = load_config(sys.argv[1])
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        print(f"{sys.argv[1]}: OK ({config.daemon.workers} workers)")
        return
    print(config_reference_markdown(), end="")


if __name__ == "__main__":
    _main()
