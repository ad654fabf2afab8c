"""Tests of daemon/config.py: defaults, precedence, every error kind, the docs table."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avatard.daemon import config as config_module
from avatard.daemon.config import (
    Config,
    ConfigError,
    all_keys,
    config_reference_markdown,
    load_config,
    parse_override,
    resolved_devices,
    resolved_endpoint,
    resolved_runtime_dir,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "avatard.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: dict | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides or {})
    return caught.value


# ---------------------------------------------------------------------------- defaults


def test_defaults_without_a_file():
    config = load_config(None, {})
    assert config == Config()
    assert config.daemon.workers == 1
    assert config.daemon.min_ready == 1
    assert config.daemon.max_parallel_loads == 1
    assert config.daemon.devices == "auto"
    assert config.daemon.queue_size == 64
    assert config.daemon.job_deadline_s == 600.0
    assert config.daemon.drain_timeout_s == 30.0
    assert config.daemon.metrics_port == 0
    assert config.daemon.metrics_host == "127.0.0.1"
    assert config.daemon.log_level == "info"
    assert config.timeouts.hello_s == 30.0
    assert config.timeouts.load_s == 600.0
    assert config.timeouts.warmup_s == 120.0
    assert config.timeouts.heartbeat_interval_s == 1.0
    assert config.timeouts.heartbeat_timeout_s == 10.0
    assert config.timeouts.stall_timeout_s == 30.0
    assert config.timeouts.kill_grace_s == 5.0
    assert config.timeouts.client_call_s == 30.0
    assert config.restart.max_load_attempts == 3
    assert config.restart.backoff_initial_s == 1.0
    assert config.restart.backoff_max_s == 60.0
    assert config.restart.backoff_factor == 2.0
    assert config.restart.crash_loop_window_s == 60.0
    assert config.restart.max_job_attempts == 2
    assert config.rings.frame_slots == 8
    assert config.rings.frame_slot_bytes == 512 * 512 * 3
    assert config.rings.audio_slots == 4
    assert config.rings.audio_slot_bytes == 256 * 1024
    assert config.rings.input_slots == 4
    assert config.rings.input_slot_bytes == 1024 * 1024
    assert config.rings.inline_slots == 2
    assert config.rings.inline_slot_bytes == 8 * 1024 * 1024
    assert config.avatars.max_count == 64
    assert config.avatars.max_bytes == 16 * 1024 * 1024
    assert config.avatars.worker_cache_size == 8
    assert (config.engines.avatar, config.engines.tts, config.engines.asr) == ("embedded",) * 3
    assert config.engines.options == {}


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write_toml(tmp_path, ""), {}) == Config()


def test_config_is_frozen_and_slotted():
    config = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.daemon.workers = 3  # type: ignore[misc]
    assert not hasattr(config.daemon, "__dict__")


def test_floats_accept_ints_and_stay_floats(tmp_path):
    config = load_config(write_toml(tmp_path, "[daemon]\njob_deadline_s = 90\n"), {})
    assert config.daemon.job_deadline_s == 90.0
    assert isinstance(config.daemon.job_deadline_s, float)


def test_the_sample_config_loads():
    config = load_config(REPO_ROOT / "systemd" / "avatard.toml", {})
    assert isinstance(config, Config)


# ---------------------------------------------------------------------------- precedence


def test_file_beats_defaults_and_flag_beats_file(tmp_path):
    path = write_toml(
        tmp_path,
        """
        [daemon]
        workers = 2
        queue_size = 8

        [engines]
        avatar = "fake"
        """,
    )
    from_file = load_config(path, {})
    assert from_file.daemon.workers == 2
    assert from_file.daemon.queue_size == 8
    assert from_file.engines.avatar == "fake"

    flagged = load_config(path, {"daemon.workers": 4, "engines.tts": "fake"})
    assert flagged.daemon.workers == 4  # the flag wins over the file
    assert flagged.daemon.queue_size == 8  # untouched file values stay
    assert flagged.engines.avatar == "fake"
    assert flagged.engines.tts == "fake"


def test_engine_option_tables_and_option_overrides(tmp_path):
    path = write_toml(
        tmp_path,
        """
        [engines]
        avatar = "fake"

        [engines.options.fake]
        load_s = 1.5
        fault_workers = [1, 3, 5]
        """,
    )
    config = load_config(path, {"engines.options.fake.load_s": 0.25})
    assert config.engines.options == {"fake": {"load_s": 0.25, "fault_workers": [1, 3, 5]}}
    # Callers get copies: editing them cannot change the frozen config.
    options = config.engines.engine_options("fake")
    options["fault_workers"].append(7)
    assert config.engines.options["fake"]["fault_workers"] == [1, 3, 5]
    assert config.engines.engine_options("ditto") == {}


def test_overrides_do_not_alias_the_callers_dict():
    given = {"load_s": 1.0}
    config = load_config(None, {"engines.options.fake": given})
    given["load_s"] = 9.0
    assert config.engines.options["fake"] == {"load_s": 1.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("daemon.workers=4", ("daemon.workers", 4)),
        ("daemon.job_deadline_s = 2.5", ("daemon.job_deadline_s", 2.5)),
        ("engines.avatar=fake", ("engines.avatar", "fake")),
        ('engines.avatar="fake"', ("engines.avatar", "fake")),
        ("engines.options.fake.load_hang=true", ("engines.options.fake.load_hang", True)),
        (
            "engines.options.fake.fault_workers=[1, 3]",
            ("engines.options.fake.fault_workers", [1, 3]),
        ),
        (
            "daemon.tcp_endpoint=tcp://127.0.0.1:7780",
            ("daemon.tcp_endpoint", "tcp://127.0.0.1:7780"),
        ),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("daemon.workers")


# ---------------------------------------------------------------------------- errors


def test_unknown_key_suggests_the_close_one(tmp_path):
    error = error_of(write_toml(tmp_path, "[daemon]\nwokers = 2\n"))
    assert error.key == "daemon.wokers"
    assert "unknown key (did you mean daemon.workers?)" in str(error)
    assert str(tmp_path / "avatard.toml") in str(error)


def test_unknown_key_in_the_wrong_section_names_the_right_one(tmp_path):
    error = error_of(write_toml(tmp_path, "[timeouts]\nworkers = 2\n"))
    assert error.key == "timeouts.workers"
    assert "did you mean daemon.workers?" in str(error)


def test_unknown_section(tmp_path):
    error = error_of(write_toml(tmp_path, "[deamon]\nworkers = 2\n"))
    assert error.key == "deamon"
    assert "unknown key (did you mean daemon?)" in str(error)


def test_unknown_override_key_names_the_command_line():
    error = error_of(None, {"timeouts.hello": 3})
    assert error.key == "timeouts.hello"
    assert "did you mean timeouts.hello_s?" in str(error)
    assert error.source == "command line"
    assert "(from command line)" in str(error)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("daemon.workers", "4", "expected int, got str"),
        ("daemon.workers", 2.0, "expected int, got float"),
        ("daemon.workers", True, "expected int, got bool"),
        ("daemon.job_deadline_s", "600", "expected float, got str"),
        ("daemon.log_level", 3, "expected str, got int"),
        ("engines.options", 3, "expected table, got int"),
        ("engines.options.fake", [1], "expected table, got array"),
    ],
)
def test_wrong_type_names_key_and_types(key, value, reason):
    error = error_of(None, {key: value})
    assert error.key == key
    assert error.reason == reason
    assert str(error).startswith(f"{key}: {reason}")


def test_wrong_type_in_file(tmp_path):
    error = error_of(write_toml(tmp_path, '[daemon]\nworkers = "four"\n'))
    assert str(error) == (
        f"daemon.workers: expected int, got str (from {tmp_path / 'avatard.toml'})"
    )


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("daemon.workers", 0, "must be >= 1"),
        ("daemon.min_ready", 0, "must be >= 1"),
        ("daemon.max_parallel_loads", -1, "must be >= 1"),
        ("daemon.queue_size", 0, "must be >= 1"),
        ("daemon.job_deadline_s", 0, "must be > 0"),
        ("daemon.drain_timeout_s", -0.5, "must be >= 0"),
        ("daemon.metrics_port", 65536, "must be <= 65535"),
        ("daemon.metrics_port", -1, "must be >= 0"),
        ("daemon.log_level", "verbose", "must be one of debug, info, warning, error"),
        ("timeouts.heartbeat_timeout_s", 0.0, "must be > 0"),
        ("timeouts.kill_grace_s", -1, "must be >= 0"),
        ("restart.max_load_attempts", 0, "must be >= 1"),
        ("restart.backoff_factor", 0.5, "must be >= 1"),
        ("restart.max_job_attempts", 0, "must be >= 1"),
        ("rings.frame_slots", 1, "must be >= 2"),
        ("rings.audio_slot_bytes", 1026, "must be a multiple of 4"),
        ("daemon.job_deadline_s", float("inf"), "must be a finite number"),
        ("daemon.devices", "gpu0", 'must be "auto", "cpu" or GPU indices'),
        ("daemon.devices", "0,0", "GPU 0 is listed twice"),
        ("daemon.endpoint", "http://x", "must start with ipc:// or tcp://"),
        ("daemon.tcp_endpoint", "ipc:///tmp/x.sock", "must start with tcp://"),
        ("daemon.tcp_endpoint", "tcp://127.0.0.1", "must look like tcp://HOST:PORT"),
        ("daemon.runtime_dir", "relative/dir", "must be an absolute path"),
        ("daemon.endpoint", "ipc:///" + "x" * 200, "over the 107-byte limit"),
    ],
)
def test_out_of_range_names_key_and_rule(key, value, reason):
    error = error_of(None, {key: value})
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"{key}: ")


def test_log_level_typo_suggests(tmp_path):
    error = error_of(None, {"daemon.log_level": "warn"})
    assert "did you mean warning?" in str(error)


def test_unknown_engine_name():
    error = error_of(None, {"engines.avatar": "fak"})
    assert error.key == "engines.avatar"
    assert "unknown avatar engine 'fak'" in error.reason
    assert "did you mean fake?" in error.reason
    # faster-whisper is an ASR engine, not a TTS engine.
    error = error_of(None, {"engines.tts": "faster-whisper"})
    assert error.key == "engines.tts"


def test_unknown_engine_options_table():
    error = error_of(None, {"engines.options.fkae": {"load_s": 1}})
    assert error.key == "engines.options.fkae"
    assert "did you mean fake?" in error.reason


# ---------------------------------------------------------------------------- engine options


def test_engine_option_typo_in_a_file_suggests_the_option(tmp_path):
    path = write_toml(tmp_path, """
        [engines]
        avatar = "fake"

        [engines.options.fake]
        frame_mss = 3
        """)
    error = error_of(path)
    assert error.key == "engines.options.fake.frame_mss"
    assert "unknown option (did you mean frame_ms?), got 3" in error.reason
    assert "known options: load_s, " in error.reason
    assert error.source == str(path)


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        # an ill-typed value: the value and what the option takes
        ({"engines.avatar": "fake", "engines.options.fake.frame_ms": "3"},
         "engines.options.fake.frame_ms", "must be a number >= 0; expected float, got str '3'"),
        # bool is not an int
        ({"engines.avatar": "fake", "engines.options.fake.alloc_mb": True},
         "engines.options.fake.alloc_mb", "expected int, got bool True"),
        # out of range
        ({"engines.avatar": "ditto", "engines.options.ditto": {"weights": "random",
                                                               "max_batch": 0}},
         "engines.options.ditto.max_batch", "must be in 1..64, got 0 (not >= 1)"),
        # a choice, with a did-you-mean
        ({"engines.avatar": "ditto", "engines.options.ditto": {"weights": "random",
                                                               "dtype": "bfloat"}},
         "engines.options.ditto.dtype",
         "must be one of auto, float32, bfloat16, float16, got 'bfloat' (did you mean bfloat16?)"),
        # a required option of a configured engine
        ({"engines.avatar": "ditto"}, "engines.options.ditto.weights", "is required"),
        ({"engines.asr": "faster-whisper"}, "engines.options.faster-whisper.model_dir",
         "is required"),
        # two options that contradict each other
        ({"engines.options.embedded.noise_scale": 0.5}, "engines.options.embedded.noise_scale",
         "set deterministic = false to use it"),
        # the worker's context is not an option
        ({"engines.avatar": "fake", "engines.options.fake.worker_index": 1},
         "engines.options.fake.worker_index", "unknown option"),
        # a table for an engine that is not configured is still checked
        ({"engines.options.ditto.sampling_timesteps": 0},
         "engines.options.ditto.sampling_timesteps", "must be in 1..1000, got 0"),
        ({"engines.options.coqui.sed": 1}, "engines.options.coqui.sed", "did you mean seed?"),
        # an option of the embedded TTS while another TTS is configured
        ({"engines.tts": "fake", "engines.options.embedded.length_scale": 1.2},
         "engines.options.embedded.length_scale",
         "only the tts engine embedded declares it, and engines.tts is not embedded"),
        # an engine name no kind has
        ({"engines.options.dito.weights": "random"}, "engines.options.dito",
         "did you mean ditto?"),
    ],
)
def test_engine_option_errors_name_key_value_and_rule(overrides, key, reason):
    error = error_of(None, overrides)
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"{key}: ")


def test_engine_option_tables_that_fit_are_kept_as_plain_tables():
    config = load_config(None, {
        # one table for the three embedded engines: each declares some of the keys
        "engines.options.embedded": {"cache_size": 4, "length_scale": 1.2, "vad": True},
        # tables of engines not configured: checked, required options aside
        "engines.options.ditto": {"max_batch": 8},
        "engines.options.fake": {"load_s": 1},
    })
    assert config.engines.options == {
        "embedded": {"cache_size": 4, "length_scale": 1.2, "vad": True},
        "ditto": {"max_batch": 8},
        "fake": {"load_s": 1},
    }
    ditto = load_config(None, {"engines.avatar": "ditto", "engines.options.ditto.weights":
                               "random", "engines.options.ditto.batch_wait_ms": 5})
    assert ditto.engines.engine_options("ditto") == {"weights": "random", "batch_wait_ms": 5}


def test_config_with_every_engine_loads_without_torch(tmp_path):
    # Model folders must exist when the config loads (a typo'd path is a config error).
    for name in ("vits", "whisper"):
        (tmp_path / "models" / name).mkdir(parents=True)
    path = write_toml(tmp_path, f"""
        [engines]
        avatar = "ditto"
        tts = "coqui"
        asr = "faster-whisper"

        [engines.options.ditto]
        weights = "random"
        max_batch = 8

        [engines.options.coqui]
        model_dir = "{tmp_path}/models/vits"

        [engines.options.faster-whisper]
        model_dir = "{tmp_path}/models/whisper"

        [engines.options.embedded]
        cache_size = 4
        length_scale = 1.1

        [engines.options.fake]
        frame_ms = 2
        """)
    heavy = ("torch", "onnxruntime", "cv2", "piper", "faster_whisper", "ctranslate2", "TTS",
             "avatard.engines.fake", "avatard.engines.ditto.engine",
             "avatard.engines.embedded.avatar", "avatard.engines.embedded.tts",
             "avatard.engines.embedded.asr", "avatard.engines.coqui_tts",
             "avatard.engines.whisper_asr")
    code = ("import sys\nfrom avatard.daemon.config import load_config\n"
            f"load_config({str(path)!r})\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _serve_refused(tmp_path: Path, *args: str) -> str:
    """Run `avatard serve ARGS` with a private runtime dir; assert it exits 78 before the
    supervisor started (no runtime dir, no segment) and return its one stderr line."""
    from daemon_harness import AVATARD

    from avatard.ipc.segments import segments_of

    runtime = tmp_path / "run"
    command = [AVATARD, "serve", "--set", f"daemon.runtime_dir={runtime}", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == config_module.EXIT_CONFIG_ERROR == 78, stderr
    # One line and nothing else: no supervisor or worker ever logged.
    [line] = stderr.strip().splitlines()
    # Refused before the supervisor started: no runtime dir, socket or shared memory.
    assert not runtime.exists()
    assert segments_of(process.pid) == []
    return line


@pytest.mark.parametrize("how", ["flag", "file"])
def test_serve_exits_78_on_an_engine_option_typo_before_any_worker(tmp_path, how):
    args = ["--engine", "fake"]
    if how == "flag":
        args += ["--set", "engines.options.fake.frame_mss=3"]
    else:
        config = write_toml(tmp_path, "[engines.options.fake]\nframe_mss = 3\n")
        args += ["--config", str(config)]
    line = _serve_refused(tmp_path, *args)
    assert line.startswith("avatard serve: bad config: engines.options.fake.frame_mss: ")
    assert "got 3" in line and "did you mean frame_ms?" in line


def test_serve_says_which_engine_an_option_of_another_engine_belongs_to(tmp_path):
    line = _serve_refused(tmp_path, "--engine", "embedded",
                          "--set", "engines.options.embedded.max_batch=4")
    assert line.startswith("avatard serve: bad config: engines.options.embedded.max_batch: "
                           "unknown option (max_batch belongs to the avatar engine ditto: "
                           'select it with engines.avatar = "ditto" and set its options under '
                           "[engines.options.ditto]), got 4")


@pytest.mark.parametrize(
    ("args", "key", "engine", "places"),
    [
        (["--engine", "ditto"], "engines.options.ditto.weights", "avatar engine ditto",
         ["in the config file under [engines.options.ditto] (weights = ...)",
          "--set engines.options.ditto.weights=VALUE", "avatard serve --checkpoints DIR"]),
        (["--engine", "fake", "--set", "engines.tts=coqui"], "engines.options.coqui.model_dir",
         "tts engine coqui",
         ["in the config file under [engines.options.coqui] (model_dir = ...)",
          "--set engines.options.coqui.model_dir=VALUE"]),
    ],
)
def test_serve_names_where_a_missing_required_option_is_set(tmp_path, args, key, engine,
                                                            places):
    line = _serve_refused(tmp_path, *args)
    assert line.startswith(f"avatard serve: bad config: {key}: is required by the {engine} ")
    for place in places:
        assert place in line, line


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"daemon.workers": 2, "daemon.min_ready": 3}, "daemon.min_ready", "<= daemon.workers (2)"),
        (
            {"restart.backoff_initial_s": 10, "restart.backoff_max_s": 5},
            "restart.backoff_initial_s",
            "<= restart.backoff_max_s (5)",
        ),
        (
            {"timeouts.heartbeat_interval_s": 10},
            "timeouts.heartbeat_interval_s",
            "< timeouts.heartbeat_timeout_s (10)",
        ),
    ],
)
def test_cross_field_rules(overrides, key, reason):
    error = error_of(None, overrides)
    assert error.key == key
    assert reason in error.reason


def test_cross_field_rule_fixed_by_a_flag(tmp_path):
    path = write_toml(tmp_path, "[daemon]\nworkers = 2\nmin_ready = 2\n")
    assert error_of(path, {"daemon.workers": 1}).key == "daemon.min_ready"
    assert load_config(path, {"daemon.workers": 3}).daemon.min_ready == 2


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    path = write_toml(tmp_path, "[daemon]\nworkers = 2\nqueue_size 8\n")
    error = error_of(path)
    assert error.key == ""
    assert str(path) in str(error)
    assert "line 3" in str(error)
    assert re.search(r"column \d+", str(error))


def test_missing_file(tmp_path):
    error = error_of(tmp_path / "nope.toml")
    assert "does not exist" in str(error)


def test_override_through_a_non_table():
    error = error_of(None, {"daemon.workers": 2, "daemon.workers.x": 1})
    assert error.key == "daemon.workers"
    assert "expected table" in error.reason


# ---------------------------------------------------------------------------- resolution


def test_runtime_dir_resolution_order(tmp_path):
    config = load_config(None, {})
    env = {
        "AVATARD_RUNTIME_DIR": "/a/rt",
        "RUNTIME_DIRECTORY": "/run/avatard:/run/other",
        "XDG_RUNTIME_DIR": "/run/user/1000",
    }
    assert resolved_runtime_dir(config, env) == Path("/a/rt")
    del env["AVATARD_RUNTIME_DIR"]
    assert resolved_runtime_dir(config, env) == Path("/run/avatard")
    del env["RUNTIME_DIRECTORY"]
    assert resolved_runtime_dir(config, env) == Path("/run/user/1000/avatard")
    del env["XDG_RUNTIME_DIR"]
    assert resolved_runtime_dir(config, env) == Path(f"/tmp/avatard-{os.getuid()}")
    explicit = load_config(None, {"daemon.runtime_dir": str(tmp_path)})
    assert resolved_runtime_dir(explicit, {"AVATARD_RUNTIME_DIR": "/a/rt"}) == tmp_path


def test_runtime_dir_reads_the_real_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATARD_RUNTIME_DIR", str(tmp_path))
    assert resolved_runtime_dir(load_config(None, {})) == tmp_path


def test_endpoint_resolution(tmp_path):
    config = load_config(None, {})
    assert resolved_endpoint(config, {"AVATARD_RUNTIME_DIR": str(tmp_path)}) == (
        f"ipc://{tmp_path}/avatard.sock"
    )
    explicit = load_config(None, {"daemon.endpoint": "tcp://127.0.0.1:7781"})
    assert resolved_endpoint(explicit, {}) == "tcp://127.0.0.1:7781"
    with pytest.raises(ConfigError, match="107-byte limit"):
        resolved_endpoint(config, {"AVATARD_RUNTIME_DIR": "/" + "d" * 120})


def test_device_resolution():
    auto = load_config(None, {})
    assert resolved_devices(auto, visible_gpu_count=0) == ["cpu"]
    assert resolved_devices(auto, visible_gpu_count=2) == ["cuda:0", "cuda:1"]
    assert resolved_devices(load_config(None, {"daemon.devices": "cpu"}), 4) == ["cpu"]
    listed = load_config(None, {"daemon.devices": "1, 0"})
    assert resolved_devices(listed, 0) == ["cuda:1", "cuda:0"]


# ---------------------------------------------------------------------------- docs


def test_docs_table_matches_the_dataclasses():
    text = (REPO_ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    begin = text.index(config_module.DOCS_BEGIN) + len(config_module.DOCS_BEGIN)
    end = text.index(config_module.DOCS_END)
    assert text[begin:end].strip() == config_reference_markdown().strip(), (
        "docs/config.md is stale: regenerate the table with python -m avatard.daemon.config"
    )


def test_every_key_is_documented_with_a_meaning():
    reference = config_reference_markdown()
    for key in all_keys():
        rows = [line for line in reference.splitlines() if line.startswith(f"| `{key}` |")]
        assert len(rows) == 1, key
        meaning = rows[0].rstrip(" |").rsplit(" | ", 1)[1]
        assert len(meaning) > 10, key


def test_config_module_imports_nothing_heavy():
    # The supervisor imports this module and must never pull in torch or an engine.
    code = (
        "import sys, avatard.daemon.config; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'zmq', 'avatard.engines.fake') "
        "if m in sys.modules]; print(heavy)"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_command_line_check_exits_78_on_a_bad_file(tmp_path):
    bad = write_toml(tmp_path, '[daemon]\nworkers = "x"\n')
    command = [sys.executable, "-m", "avatard.daemon.config", str(bad)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == config_module.EXIT_CONFIG_ERROR == 78
    assert "daemon.workers: expected int, got str" in result.stderr
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "avatard.daemon.config",
            str(REPO_ROOT / "systemd" / "avatard.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr


def test_bounds_are_written_as_people_write_them():
    """Whole-number bounds in full, sizes also in binary units, in errors and in the docs
    (not 1.04858e+06)."""
    reason = error_of(None, {"daemon.streamed_input_bytes": 5}).reason
    assert reason == "must be >= 1048576 (1 MiB), got 5", reason
    assert error_of(None, {"daemon.max_media_s": 1e6}).reason == "must be <= 86400, got 1000000.0"
    reference = config_reference_markdown()
    assert "| >= 1048576 (1 MiB) |" in reference
    assert not re.search(r"\de[+-]\d", reference), "a bound in scientific notation"
