"""Hostile configuration: `load_config` on random TOML-ish text, random key/value trees and
random overrides returns a config or raises `ConfigError`, nothing else."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatard.daemon.config import Config, ConfigError, all_keys, load_config, parse_override

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
KNOWN = all_keys()
SECTIONS = sorted({k.split(".")[0] for k in KNOWN}) + ["engines.options.fake"]
FIELDS = sorted({k.split(".", 1)[1] for k in KNOWN})
# TOML integers are 64-bit; bigger ones have their own test below.
SCALARS = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.sampled_from([0, -1, 1, 2, 65536, 2**31]), st.floats(),
                    st.text(max_size=20), st.sampled_from(["cpu", "cuda:0", "fake", "ipc://",
                                                           "tcp://0.0.0.0:1", "/tmp", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def check(path: Path | None, overrides: dict[str, Any] | None = None) -> None:
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(config, Config)


@EXAMPLES
@given(st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)),
                       st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)),
                                       VALUES, max_size=5), max_size=4))
def test_random_trees(tmp_path: Path, tree: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, table in tree.items():
        lines.append(f"[{json.dumps(section) if '.' not in section else section}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    path = tmp_path / "random.toml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    check(path)


TOMLISH = st.text(alphabet=st.sampled_from(list("[]{}=.,\"'#\n \t-+_0123456789eEnaintfrus"
                                                 "daemonworkers\x00\u00e9\ud800")), max_size=120)


@EXAMPLES
@given(st.one_of(TOMLISH, st.binary(max_size=120).map(lambda b: b.decode("latin-1"))))
def test_random_tomlish_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.toml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    check(path)


@EXAMPLES
@given(st.dictionaries(st.one_of(st.sampled_from(KNOWN), st.text(max_size=12)), VALUES,
                       max_size=4))
def test_random_overrides(overrides: dict[str, Any]) -> None:
    check(None, overrides)


@EXAMPLES
@given(st.text(max_size=60))
def test_parse_override_of_random_text(text: str) -> None:
    try:
        key, _ = parse_override(text)
    except ConfigError:
        return
    assert key


def test_missing_file_and_directory(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.toml", tmp_path):
        with pytest.raises(ConfigError):
            load_config(path)


@pytest.mark.parametrize("how", ["file", "override"])
def test_huge_integer_for_a_float_key(tmp_path: Path, how: str) -> None:
    path = tmp_path / "big.toml"
    path.write_text("[timeouts]\nhello_s = " + "9" * 400 + "\n")
    with pytest.raises(ConfigError):
        if how == "file":
            load_config(path)
        else:
            load_config(None, {"timeouts.hello_s": 10**400})


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a=" * 2000 + "1" + "}" * 2000])
def test_deeply_nested_toml(tmp_path: Path, value: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(f"[daemon]\nx = {value}\n")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("text", ["daemon.workers=" + "9" * 5000, "daemon.workers=" + "[" * 3000])
def test_parse_override_of_huge_values(text: str) -> None:
    try:
        parse_override(text)
    except ConfigError:
        pass
