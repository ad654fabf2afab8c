"""Typed engine options: the parser (engines/options.py), every engine's options class, the
registry's shared tables and worker context (engines/registry.py), and the generated docs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from avatard.engines.base import EngineInputError, WorkerContext
from avatard.engines.ditto.options import DittoOptions
from avatard.engines.embedded.options import (
    EmbeddedAvatarOptions,
    EmbeddedWhisperOptions,
    PiperTTSOptions,
)
from avatard.engines.fake_options import FakeOptions
from avatard.engines.options import (
    EngineOptionError,
    OptionConflict,
    RequiredOptionError,
    option,
    option_specs,
    parse_options,
)
from avatard.engines.options_docs import BLOCK, engine_options_markdown, refresh_generated_blocks
from avatard.engines.registry import (
    ENGINES,
    check_engine_options,
    engine_options_class,
    load_engine,
    parse_engine_options,
)
from avatard.engines.speech_options import CoquiTTSOptions, FasterWhisperOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "engines.options.test"


# ---------------------------------------------------------------------------- the parser


@dataclass(frozen=True, kw_only=True)
class Sample:
    """Options of no engine: one field of every kind the parser knows."""

    path: str = option(doc="A required path.", nonempty=True)
    count: int = option(4, "An integer with two bounds.", ge=1, le=64)
    step: int = option(2, "An even integer.", ge=0, multiple_of=2)
    rate: float = option(1.0, "A number above zero.", gt=0)
    flag: bool = option(False, "A switch.")
    mode: str = option("fast", "A choice.", choices=("fast", "slow"))
    workers: tuple[int, ...] | None = option(None, "Integers >= 0.", ge=0)
    kinds: tuple[str, ...] = option(("a",), "Strings from a set.", choices=("a", "b"))
    device_default: int | None = option(None, "Set by the engine.", ge=1,
                                        default_doc="the device's own")

    def __post_init__(self) -> None:
        if self.flag and self.mode == "slow":
            raise OptionConflict("flag", "cannot be true with mode = slow")


def parse(**table: Any) -> Sample:
    return parse_options(Sample, {"path": "/x", **table}, PREFIX)


def refusal(table: dict[str, Any], cls: type = Sample, prefix: str = PREFIX) -> EngineOptionError:
    with pytest.raises(EngineOptionError) as caught:
        parse_options(cls, table, prefix)
    return caught.value


def test_parse_gives_the_typed_object_with_defaults():
    assert parse() == Sample(path="/x")
    parsed = parse(count=64, rate=3, workers=[0, 2], kinds=["b", "a"], device_default=5)
    assert parsed.rate == 3.0 and isinstance(parsed.rate, float)  # an int passes as a float
    assert parsed.workers == (0, 2) and parsed.kinds == ("b", "a")  # arrays become tuples
    assert (parsed.count, parsed.device_default) == (64, 5)


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"count": True}, "count", "must be an integer in 1..64; expected int, got bool True"),
        ({"count": 2.0}, "count", "expected int, got float 2.0"),
        ({"rate": False}, "rate", "expected float, got bool False"),
        ({"flag": 1}, "flag", "must be true or false; expected bool, got int 1"),
        ({"mode": 3}, "mode", "expected str, got int 3"),
        ({"workers": [1, True]}, "workers", "expected list of ints, got array [1, True]"),
        ({"workers": 1}, "workers", "a list, each entry an integer >= 0"),
        ({"count": 0}, "count", "must be in 1..64, got 0 (not >= 1)"),
        ({"count": 65}, "count", "must be in 1..64, got 65 (not <= 64)"),
        ({"step": 3}, "step", "must be even, got 3"),
        ({"step": -2}, "step", "must be >= 0, got -2"),
        ({"rate": 0}, "rate", "must be a number > 0, got 0"),
        ({"rate": float("nan")}, "rate", "must be a number > 0, got nan"),
        ({"rate": float("inf")}, "rate", "must be a number > 0, got inf"),
        ({"rate": 10**400}, "rate", "must be a number > 0"),
        ({"mode": "slwo"}, "mode", "must be one of fast, slow, got 'slwo' (did you mean slow?)"),
        ({"path": ""}, "path", "must not be empty"),
        ({"workers": [0, -1]}, "workers", "every entry must be an integer >= 0, got [0, -1]"),
        ({"kinds": ["c"]}, "kinds", "every entry must be one of a, b, got ['c']"),
        ({"device_default": 0}, "device_default", "must be >= 1, got 0"),
        ({"flag": True, "mode": "slow"}, "flag", "cannot be true with mode = slow"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(table, key, reason):
    error = refusal({"path": "/x", **table})
    assert error.key == f"{PREFIX}.{key}"
    assert reason in error.reason
    assert str(error) == f"{PREFIX}.{key}: {error.reason}"
    assert repr(error.value) == repr(table[key])  # repr: NaN is not equal to itself
    # One error type: an EngineInputError (field = key), hence a ValueError.
    assert isinstance(error, EngineInputError) and isinstance(error, ValueError)
    assert error.field == error.key


def test_the_allowed_values_are_carried_on_the_error():
    assert refusal({"path": "/x", "count": 0}).allowed == "an integer in 1..64"
    assert refusal({"path": "/x", "mode": "x"}).allowed == "one of fast, slow"
    assert refusal({"path": "/x", "kinds": ["x"]}).allowed == "a list, each entry one of a, b"


def test_an_unknown_key_suggests_the_close_one_and_lists_the_known():
    error = refusal({"path": "/x", "cuont": 3})
    assert error.key == f"{PREFIX}.cuont"
    assert error.value == 3
    assert "unknown option (did you mean count?), got 3" in error.reason
    assert "known options: path, count, step, rate" in error.reason
    far = refusal({"path": "/x", "zzz": 1})
    assert "did you mean" not in far.reason and "known options:" in far.reason


def test_a_missing_required_option_and_a_table_that_is_not_a_table():
    error = refusal({})
    assert error.key == f"{PREFIX}.path" and error.value is None
    assert "is required (a non-empty string): A required path." == error.reason
    not_a_table = refusal([1])  # type: ignore[arg-type]
    assert (not_a_table.key, not_a_table.reason) == (PREFIX, "expected table, got array")


def test_an_option_type_without_a_toml_form_is_a_class_error():
    @dataclass(frozen=True, kw_only=True)
    class Bad:
        mapping: dict = option(None, "TOML tables are not option values.")

    with pytest.raises(TypeError, match="Bad.mapping"):
        option_specs(Bad)


# ---------------------------------------------------------------------------- every engine

# Per options class: what a minimal valid table needs, some defaults, an unknown key with the
# option it resembles, a wrong type, an out-of-range value and an integer option.
# A folder that exists: path options are checked against the file system.
EXISTING_DIR = str(Path(__file__).resolve().parent)

CASES: dict[type, dict[str, Any]] = {
    FakeOptions: dict(
        prefix="engines.options.fake", required={},
        defaults={"load_s": 0.0, "width": 64, "height": 64, "fps": 25, "audio_rate": 16000,
                  "load_kinds": ("avatar",), "fault_workers": None, "crash_exit_code": 70},
        typo=("frame_mss", "frame_ms"), wrong=("load_s", "1", "expected float, got str"),
        out_of_range=("width", 5000, "must be in 8..4096, got 5000 (not <= 4096)"),
        integer="alloc_mb",
    ),
    DittoOptions: dict(
        prefix="engines.options.ditto", required={"weights": "random"},
        # The defaults the engine had before typed options; None: the device decides.
        defaults={"seed": 0, "dtype": "auto", "mode": "offline", "sampling_timesteps": None,
                  "cache_size": 8,
                  "max_batch": None, "max_windows": None, "batch_wait_ms": 2.0,
                  "cuda_graphs": None, "serving_layers": True, "channels_last": False,
                  "cudnn_benchmark": True, "compile": None, "warmup": True},
        typo=("sampling_timestep", "sampling_timesteps"),
        wrong=("dtype", 16, "expected str, got int"),
        out_of_range=("max_batch", 65, "must be in 1..64, got 65"),
        integer="cache_size",
    ),
    EmbeddedAvatarOptions: dict(
        prefix="engines.options.embedded", required={},
        defaults={"cache_size": 16, "warmup": True},
        typo=("cache_sise", "cache_size"), wrong=("warmup", "yes", "expected bool, got str"),
        out_of_range=("cache_size", 0, "must be >= 1, got 0"), integer="cache_size",
    ),
    PiperTTSOptions: dict(
        prefix="engines.options.embedded", required={},
        defaults={"model_path": None, "length_scale": None, "deterministic": True,
                  "noise_scale": None, "volume": 1.0, "max_text_chars": 5000,
                  "max_sentence_chars": 300},
        typo=("lenght_scale", "length_scale"), wrong=("model_path", 3, "expected str, got int"),
        out_of_range=("volume", 0, "must be a number > 0, got 0"), integer="max_text_chars",
    ),
    EmbeddedWhisperOptions: dict(
        prefix="engines.options.embedded", required={},
        defaults={"compute_type": None, "cpu_threads": None, "beam_size": 1, "vad": False,
                  "word_timestamps": True, "max_duration_s": 600.0, "language": None},
        typo=("beam_sise", "beam_size"), wrong=("vad", "no", "expected bool, got str"),
        out_of_range=("max_duration_s", -1, "must be a number > 0, got -1"),
        integer="beam_size",
    ),
    CoquiTTSOptions: dict(
        prefix="engines.options.coqui", required={"model_dir": EXISTING_DIR},
        defaults={"model_file": None, "vocoder_dir": None, "speaker": None, "language": None,
                  "seed": 0, "max_text_chars": 5000, "max_sentence_chars": 300},
        typo=("speeker", "speaker"), wrong=("seed", "0", "expected int, got str"),
        out_of_range=("max_text_chars", 0, "must be >= 1, got 0"), integer="seed",
    ),
    FasterWhisperOptions: dict(
        prefix="engines.options.faster-whisper", required={"model_dir": EXISTING_DIR},
        defaults={"compute_type": None, "cpu_threads": None, "beam_size": 1, "vad": False,
                  "word_timestamps": True, "max_duration_s": 600.0},
        typo=("compute_typ", "compute_type"),
        wrong=("word_timestamps", 1, "expected bool, got int"),
        out_of_range=("cpu_threads", 0, "must be >= 1, got 0"), integer="cpu_threads",
    ),
}
CLASSES = list(CASES)
IDS = [cls.__name__ for cls in CLASSES]


def test_every_registered_options_class_has_its_cases():
    registered = {engine_options_class(kind, name) for kind, table in ENGINES.items()
                  for name in table}
    assert registered == set(CASES)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_defaults(cls):
    case = CASES[cls]
    parsed = parse_options(cls, case["required"], case["prefix"])
    assert parsed == cls(**case["required"])
    for name, value in case["defaults"].items():
        assert getattr(parsed, name) == value, name
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    for spec in option_specs(cls):
        assert len(spec.doc) > 10, f"{cls.__name__}.{spec.name} needs a meaning"


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_unknown_key_suggests_the_option(cls):
    case = CASES[cls]
    typo, meant = case["typo"]
    error = refusal({**case["required"], typo: 1}, cls, case["prefix"])
    assert error.key == f"{case['prefix']}.{typo}"
    assert f"did you mean {meant}?" in error.reason


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_wrong_type_is_refused(cls):
    case = CASES[cls]
    name, value, reason = case["wrong"]
    error = refusal({**case["required"], name: value}, cls, case["prefix"])
    assert (error.key, error.value) == (f"{case['prefix']}.{name}", value)
    assert reason in error.reason


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_out_of_range_is_refused(cls):
    case = CASES[cls]
    name, value, reason = case["out_of_range"]
    error = refusal({**case["required"], name: value}, cls, case["prefix"])
    assert error.key == f"{case['prefix']}.{name}"
    assert reason in error.reason


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_bool_is_not_an_int(cls):
    case = CASES[cls]
    error = refusal({**case["required"], case["integer"]: True}, cls, case["prefix"])
    assert error.key == f"{case['prefix']}.{case['integer']}"
    assert "expected int, got bool True" in error.reason


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [("sampling_timesteps", (1, 1000), (0, 1001)), ("cache_size", (1, 1024), (0, 1025)),
     ("max_batch", (1, 64), (0, 65)), ("max_windows", (1, 64), (0, 65)),
     ("batch_wait_ms", (0, 100.0), (-0.5, 100.5))],
)
def test_ditto_limits_are_the_engines(name, good, bad):
    for value in good:
        assert getattr(parse_options(DittoOptions, {"weights": "random", name: value}, "d"),
                       name) == value
    for value in bad:
        with pytest.raises(EngineOptionError, match=f"d.{name}: must be"):
            parse_options(DittoOptions, {"weights": "random", name: value}, "d")


def test_piper_noise_needs_non_deterministic_mode():
    error = refusal({"noise_scale": 0.5}, PiperTTSOptions)
    assert error.key == f"{PREFIX}.noise_scale" and error.value == 0.5
    assert "deterministic = false" in error.reason
    lively = parse_options(PiperTTSOptions, {"deterministic": False, "noise_scale": 0.5}, "p")
    assert lively.noise_scale == 0.5
    assert parse_options(PiperTTSOptions, {"noise_w_scale": 0}, "p").noise_w_scale == 0.0


# ---------------------------------------------------------------------------- shared tables

EMBEDDED_TABLE = {"cache_size": 2, "length_scale": 1.5, "beam_size": 2}


def test_each_engine_of_a_name_receives_the_keys_it_declares():
    assert parse_engine_options("avatar", "embedded", EMBEDDED_TABLE) == EmbeddedAvatarOptions(
        cache_size=2)
    assert parse_engine_options("tts", "embedded", EMBEDDED_TABLE) == PiperTTSOptions(
        length_scale=1.5)
    assert parse_engine_options("asr", "embedded", EMBEDDED_TABLE) == EmbeddedWhisperOptions(
        beam_size=2)


def test_an_unknown_key_of_a_shared_table_names_the_options_of_every_engine():
    with pytest.raises(EngineOptionError) as caught:
        parse_engine_options("avatar", "embedded", {"cache_sise": 2})
    error = caught.value
    assert error.key == "engines.options.embedded.cache_sise"
    assert "did you mean cache_size?" in error.reason
    for listed in ("avatar embedded: cache_size, warmup", "tts embedded: ", "length_scale",
                   "asr embedded: ", "beam_size"):
        assert listed in error.reason


@pytest.mark.parametrize(
    ("name", "key", "hint"),
    [
        # a Ditto option given to the embedded avatar (not "did you mean max_text_chars?")
        ("embedded", "max_batch", 'max_batch belongs to the avatar engine ditto: select it '
         'with engines.avatar = "ditto" and set its options under [engines.options.ditto]'),
        # a Coqui option given to Piper
        ("embedded", "speaker", "speaker belongs to the tts engine coqui: select it with "
         'engines.tts = "coqui"'),
        # several owners: each is named
        ("ditto", "language", "language belongs to the tts engine coqui, the asr engine "
         'embedded and the asr engine faster-whisper: select one with engines.<kind> = '),
        # a misspelt option of another engine
        ("fake", "max_bach", "did you mean max_batch? it belongs to the avatar engine ditto"),
        # a misspelt option of this engine still gets its own did-you-mean
        ("ditto", "max_bacth", "(did you mean max_batch?), got"),
    ],
)
def test_an_option_of_another_engine_says_whose_it_is(name, key, hint):
    with pytest.raises(EngineOptionError) as caught:
        check_engine_options(name, {key: 1}, [kind for kind in ("avatar", "tts", "asr")
                                              if name in ENGINES[kind]])
    assert caught.value.key == f"engines.options.{name}.{key}"
    assert hint in caught.value.reason


def test_a_key_of_an_engine_not_sharing_the_table_is_refused():
    # Only the avatar engine of the name is configured: Piper's option has no taker.
    with pytest.raises(EngineOptionError) as caught:
        parse_engine_options("avatar", "embedded", {"length_scale": 1.5}, kinds=["avatar"])
    assert caught.value.key == "engines.options.embedded.length_scale"
    assert "only the tts engine embedded declares it" in caught.value.reason


def test_a_missing_required_option_names_the_engine_and_its_table():
    with pytest.raises(RequiredOptionError) as caught:
        load_engine("tts", "coqui", "cpu", {"seed": 1})
    error = caught.value
    assert (error.key, error.name, error.engine) == (
        "engines.options.coqui.model_dir", "model_dir", "tts engine coqui")
    assert error.reason.startswith("is required by the tts engine coqui (the path of an "
                                   "existing folder): The model directory")
    assert error.reason.endswith(
        "Set it in the config file under [engines.options.coqui] (model_dir = ...).")
    more = error.with_places("on the command line", "with a flag")
    assert more.reason.endswith("(model_dir = ...), on the command line, or with a flag.")


def test_check_of_a_table_for_unconfigured_engines_leaves_required_options_aside():
    check_engine_options("ditto", {"max_batch": 8})  # weights: needed only once configured
    with pytest.raises(EngineOptionError, match="engines.options.ditto.weights: is required"):
        check_engine_options("ditto", {"max_batch": 8}, ["avatar"])
    with pytest.raises(EngineOptionError, match="engines.options.ditto.max_batch: must be in"):
        check_engine_options("ditto", {"max_batch": 0})
    with pytest.raises(KeyError):
        check_engine_options("dito", {})


# ---------------------------------------------------------------------------- loading


def test_load_engine_hands_the_worker_context_to_engines_that_declare_it():
    faulty = {"load_oom": True, "fault_workers": [1], "fault_attempts": [1]}
    with pytest.raises(MemoryError, match="worker 1, attempt 1"):
        load_engine("avatar", "fake", "cpu", faulty, context=WorkerContext(1, 1))
    spared = load_engine("avatar", "fake", "cpu", faulty, context=WorkerContext(1, 2))
    assert spared.context == WorkerContext(worker_index=1, attempt=2)
    assert load_engine("tts", "fake").context == WorkerContext(worker_index=0, attempt=1)


def test_load_engine_keeps_the_context_from_other_engines():
    # The embedded avatar's constructor takes no context; passing one must not reach it.
    engine = load_engine("avatar", "embedded", "cpu", {**EMBEDDED_TABLE, "warmup": False},
                         context=WorkerContext(3, 2))
    assert engine.options == EmbeddedAvatarOptions(cache_size=2, warmup=False)


def test_worker_context_is_not_an_option():
    with pytest.raises(EngineOptionError, match="options.fake.worker_index: unknown option"):
        load_engine("avatar", "fake", "cpu", {"worker_index": 1}, context=WorkerContext(1, 1))
    with pytest.raises(ValueError, match="attempt must be an int >= 1"):
        WorkerContext(worker_index=0, attempt=0)
    with pytest.raises(ValueError, match="worker_index must be an int >= 0"):
        WorkerContext(worker_index=True, attempt=1)  # type: ignore[arg-type]


def test_a_bad_option_fails_before_the_engine_is_imported():
    code = (
        "import sys\n"
        "from avatard.engines.registry import load_engine\n"
        "from avatard.engines.options import EngineOptionError\n"
        "try:\n"
        "    load_engine('avatar', 'ditto', 'cpu', {'weights': 'random', 'max_batch': 0})\n"
        "except EngineOptionError as exc:\n"
        "    print(exc.key)\n"
        "print(sorted(m for m in ('torch', 'avatard.engines.ditto.engine') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["engines.options.ditto.max_batch", "[]"]


# ---------------------------------------------------------------------------- docs


def test_generated_option_tables_in_the_docs_are_current():
    documented: set[str] = set()
    for path in sorted((REPO_ROOT / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        assert refresh_generated_blocks(text) == text, (
            f"{path.name} is stale: regenerate with python -m avatard.engines.options_docs "
            "docs/*.md"
        )
        documented |= {f"{path.name}({m['args']})" for m in BLOCK.finditer(text)}
    assert "config.md()" in documented  # the whole catalog
    for kind, table in ENGINES.items():
        for name in table:
            assert f'engines.md("{kind}", "{name}")' in documented or (
                name == "fake" and 'engines.md("avatar", "fake")' in documented), (kind, name)


def test_the_catalog_lists_every_option_of_every_engine():
    catalog = engine_options_markdown()
    for kind, table in ENGINES.items():
        for name in table:
            assert f"`[engines.options.{name}]`" in catalog
            for spec in option_specs(engine_options_class(kind, name)):
                assert f"| `{spec.name}` |" in catalog
