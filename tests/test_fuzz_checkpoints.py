"""Hostile pickles for the Ditto cfg's restricted unpickler (`restricted_loads`): no global
outside the allow-list is ever resolved, whatever the bytes; garbage fails quickly with an
ordinary exception."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

checkpoints = pytest.importorskip("avatard.engines.ditto.checkpoints")

EXAMPLES = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
# What a real cfg holds: plain containers, strings, numbers and numpy arrays.
SAMPLE = {"name": "ditto", "sizes": [1, 2, 3], "scale": 0.5, "flags": {"a": True},
          "mean": np.arange(6, dtype=np.float32).reshape(2, 3),
          "nested": ({"x": (1, 2)}, [np.int64(5)])}
SEEDS = [pickle.dumps(SAMPLE, protocol=p) for p in range(0, 6)]
DANGEROUS = [("os", "system"), ("posix", "system"), ("builtins", "eval"),
             ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
             ("subprocess", "Popen"), ("numpy", "load"), ("numpy.testing", "runstring"),
             ("pickle", "loads"), ("importlib", "import_module"), ("_codecs", "decode")]


def _global_pickle(module: str, name: str, arg: str = "true") -> bytes:
    """Protocol-0 pickle calling module.name(arg): GLOBAL, MARK, STRING, TUPLE, REDUCE."""
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n(S'" + arg.encode()
            + b"'\ntR.")


def _load(data: bytes) -> object:
    started = time.monotonic()
    try:
        return checkpoints.restricted_loads(data)
    except checkpoints.UnsafePickleError as exc:
        assert "refused global" in str(exc)
        raise
    finally:
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(("module", "name"), DANGEROUS)
def test_dangerous_globals_are_refused_by_name(module: str, name: str) -> None:
    with pytest.raises(checkpoints.UnsafePickleError) as err:
        _load(_global_pickle(module, name))
    assert f"{module}.{name}" in str(err.value)


@EXAMPLES
@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\n"),
               min_size=1, max_size=20),
       st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\n"),
               min_size=1, max_size=20))
def test_random_globals_are_refused(module: str, name: str) -> None:
    allowed = (module, name) in checkpoints._ALLOWED_GLOBALS
    try:
        _load(_global_pickle(module, name))
    except checkpoints.UnsafePickleError:
        assert not allowed
    except Exception:  # noqa: BLE001 - an allowed global called with a bad argument
        assert allowed


@st.composite
def mutated_pickles(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "splice", "global"]))
        if op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "splice":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(max_size=16))
        else:
            at = draw(st.integers(0, len(data)))
            module, name = draw(st.sampled_from(DANGEROUS))
            data[at:at] = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return bytes(data)


@EXAMPLES
@given(st.one_of(mutated_pickles(), st.binary(max_size=200)))
def test_hostile_pickles(data: bytes) -> None:
    returned: list[tuple[str, str]] = []
    original = checkpoints.RestrictedUnpickler.find_class

    def spy(self: object, module: str, name: str) -> object:
        found = original(self, module, name)  # type: ignore[arg-type]
        returned.append((module, name))  # reached only if the allow-list let it through
        return found

    checkpoints.RestrictedUnpickler.find_class = spy  # type: ignore[method-assign]
    try:
        _load(data)
    except Exception:  # noqa: BLE001 - any ordinary error is fine for garbage
        pass
    finally:
        checkpoints.RestrictedUnpickler.find_class = original  # type: ignore[method-assign]
    # Only allow-listed globals were ever handed to the unpickler.
    assert all(ref in checkpoints._ALLOWED_GLOBALS for ref in returned), returned


@pytest.mark.parametrize("protocol", range(0, 6))
def test_the_sample_cfg_round_trips(protocol: int) -> None:
    loaded = _load(pickle.dumps(SAMPLE, protocol=protocol))
    assert loaded["sizes"] == [1, 2, 3]  # type: ignore[index]
    np.testing.assert_array_equal(loaded["mean"], SAMPLE["mean"])  # type: ignore[index]


@pytest.mark.parametrize("protocol", [0, 1, 2])
@pytest.mark.parametrize("value", [{1, 2}, frozenset({3}), complex(1, 2)])
def test_old_protocol_pickle_of_allowed_builtins(protocol: int, value: object) -> None:
    assert _load(pickle.dumps({"v": value}, protocol=protocol)) == {"v": value}


@pytest.mark.parametrize("keep", [0, 10])
def test_load_cfg_of_a_truncated_file_names_the_file(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cfg.pkl"
    path.write_bytes(SEEDS[4][:keep])
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load_cfg(path)
    assert str(path) in str(err.value)
