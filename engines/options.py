"""Typed engine options: how an engine declares its options and how a table is checked.

Each engine's options are one frozen, keyword-only dataclass whose fields are declared with
`option()`: the default, one line of meaning, and the range or choices, stated once. Such
classes live in modules that import no engine runtime (torch, onnxruntime, OpenCV...), so
the supervisor validates `[engines.options.<name>]` while it loads the config, before any
worker starts; the worker's engine parses the same table with the same class.

`parse_options(cls, table, key_prefix)` checks every key and value of a TOML table and
returns the typed object, or raises `EngineOptionError` naming the full dotted key, the
value and what is allowed (with a did-you-mean for an unknown key). Field types, all that
TOML can say: bool, int, float, str, tuple[int, ...] and tuple[str, ...] (TOML arrays),
each optionally `| None`, where None can only be the default ("decided at load time", e.g.
from the device). bool never passes as int; an int passes as a float.

Runs in the supervisor and in workers: stdlib plus `engines.base` (numpy) only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import EngineInputError

__all__ = [
    "EngineOptionError",
    "OptionConflict",
    "OptionSpec",
    "as_options",
    "check_options",
    "option",
    "option_specs",
    "options_table_markdown",
    "parse_options",
    "unknown_option_error",
]

T = TypeVar("T")
MISSING = dataclasses.MISSING
SHOWN_VALUE_CHARS = 60  # a value quoted in an error is cut to this many characters


class EngineOptionError(EngineInputError):
    """An engine option that cannot be used.

    `key`: the full dotted key (``engines.options.ditto.max_batch``); `value`: the value
    given (None when a required option is missing); `allowed`: what the key accepts ("an
    integer in 1..64", the known option names...); `reason`: the sentence an operator
    reads, naming the value and what is allowed. It is an `EngineInputError` (field = key,
    rule = reason), so a `ValueError` too.
    """

    def __init__(self, key: str, value: Any, allowed: str, reason: str):
        super().__init__(key, reason)
        self.key = key
        self.value = value
        self.allowed = allowed
        self.reason = reason


class OptionConflict(ValueError):
    """Raised by an options class's `__post_init__` when two options disagree: `name` is
    the option to blame. `parse_options` turns it into an `EngineOptionError`."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def option(
    default: Any = MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    multiple_of: int | None = None,
    choices: tuple[str, ...] | None = None,
    choices_name: str = "",
    nonempty: bool = False,
    default_doc: str = "",
) -> Any:
    """Declare one option field (use as ``name: int = option(16, "...", ge=1)``).

    `default`: the value when the table lacks the key (MISSING: required; None: decided
    by the engine at load time, explained by `default_doc`). `doc`: one line of meaning
    with units. `ge`/`gt`/`le`: bounds of a number, or of each entry of a list;
    `multiple_of`: a step for integers; `choices`: the strings allowed (for a list: for
    each entry), `choices_name` what they are ("engine kinds"); `nonempty`: a string
    must not be "".
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "multiple_of": multiple_of,
                "choices": choices, "choices_name": choices_name, "nonempty": nonempty,
                "default_doc": default_doc}
    if isinstance(default, list):  # a mutable default: store it as the tuple it parses to
        default = tuple(default)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------- specs

_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}
_TYPE_WORDS = {"bool": "bool", "int": "int", "float": "float", "str": "str",
               "int list": "list of ints", "str list": "list of strings"}


@dataclass(frozen=True)
class OptionSpec:
    """One declared option: its name, value kind, default and rules (see `option`)."""

    name: str
    kind: str  # "bool" | "int" | "float" | "str" | "int list" | "str list"
    default: Any  # MISSING for a required option
    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    choices_name: str = ""
    nonempty: bool = False
    default_doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def type_word(self) -> str:
        """The TOML type in a word: "int", "list of ints"..."""
        return _TYPE_WORDS[self.kind]

    def range_text(self) -> str:
        """The bounds alone: "1..64", ">= 0", "> 0 and <= 1" ("" without bounds)."""
        if self.ge is not None and self.le is not None and self.gt is None:
            return f"{_number(self.ge)}..{_number(self.le)}"
        parts = [f"{op} {_number(bound)}" for op, bound in
                 ((">=", self.ge), (">", self.gt), ("<=", self.le)) if bound is not None]
        return " and ".join(parts)

    def entry_allowed(self) -> str:
        """What one value (or one entry of a list) may be, as a phrase: "an integer in
        1..64", "a number > 0", "one of float32, bfloat16", "true or false"."""
        kind = self.kind.removesuffix(" list")
        if kind == "bool":
            return "true or false"
        if kind == "str":
            if self.choices is None:
                return "a non-empty string" if self.nonempty else "a string"
            listed = f"one of {', '.join(self.choices)}"
            return f"{listed} ({self.choices_name})" if self.choices_name else listed
        noun = "a number" if kind == "float" else "an integer"
        if self.multiple_of == 2:
            noun = "an even integer"
        elif self.multiple_of:
            noun = f"an integer multiple of {self.multiple_of}"
        bounds = self.range_text()
        if not bounds:
            return noun
        return f"{noun} in {bounds}" if ".." in bounds else f"{noun} {bounds}"

    def allowed(self) -> str:
        """What the option accepts, as a phrase (for a list: "a list, each entry ...")."""
        if self.kind.endswith(" list"):
            return f"a list, each entry {self.entry_allowed()}"
        return self.entry_allowed()

    def check(self, key: str, value: Any) -> Any:
        """`value` converted to the field's type (float for an int given to a float, tuple
        for an array), or EngineOptionError naming `key`, the value and what is allowed."""
        if self.kind.endswith(" list"):
            entry_kind = self.kind.removesuffix(" list")
            if not isinstance(value, list | tuple) or not all(
                _has_kind(entry, entry_kind) for entry in value
            ):
                raise self._type_error(key, value)
            if any(self._entry_problem(entry) for entry in value):
                raise EngineOptionError(
                    key, value, self.allowed(),
                    f"every entry must be {self.entry_allowed()}, got {_show(value)}",
                )
            return tuple(float(e) if entry_kind == "float" else e for e in value)
        if not _has_kind(value, self.kind):
            raise self._type_error(key, value)
        problem = self._entry_problem(value)
        if problem:
            raise EngineOptionError(key, value, self.allowed(), problem)
        return float(value) if self.kind == "float" else value

    def _type_error(self, key: str, value: Any) -> EngineOptionError:
        return EngineOptionError(
            key, value, self.allowed(),
            f"must be {self.allowed()}; expected {self.type_word}, got "
            f"{_toml_type(value)} {_show(value)}",
        )

    def _entry_problem(self, value: Any) -> str:
        """Why a value of the right type is still refused ("" when it is fine)."""
        kind = self.kind.removesuffix(" list")
        if kind == "bool":
            return ""
        if kind == "str":
            if self.nonempty and not value:
                return "must not be empty"
            if self.choices is not None and value not in self.choices:
                close = difflib.get_close_matches(value, self.choices, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                return f"must be {self.entry_allowed()}, got {_show(value)}{hint}"
            return ""
        if kind == "float":
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if not (math.isfinite(number) and self._in_bounds(number)):
                # "a number" leads the sentence: NaN and infinity fail this same check.
                return f"must be {self.entry_allowed()}, got {_show(value)}"
            return ""
        if not self._in_bounds(value):
            bounds = self.range_text()
            if ".." in bounds:  # say which end was crossed
                crossed = f">= {_number(self.ge)}" if value < self.ge else f"<= {_number(self.le)}"
                return f"must be in {bounds}, got {value} (not {crossed})"
            return f"must be {bounds}, got {value}"
        if self.multiple_of and value % self.multiple_of:
            step = "even" if self.multiple_of == 2 else f"a multiple of {self.multiple_of}"
            return f"must be {step}, got {value}"
        return ""

    def _in_bounds(self, number: float) -> bool:
        return not (
            (self.ge is not None and number < self.ge)
            or (self.gt is not None and number <= self.gt)
            or (self.le is not None and number > self.le)
        )


@functools.cache
def option_specs(cls: type) -> tuple[OptionSpec, ...]:
    """The declared options of options class `cls`, in declaration order. Raises TypeError
    for a field type TOML cannot express (a mistake in the class, not in a config)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind = _kind_of(hints[f.name], f"{cls.__name__}.{f.name}")
        rules = {k: f.metadata.get(k) for k in ("ge", "gt", "le", "multiple_of", "choices")}
        specs.append(OptionSpec(
            name=f.name, kind=kind, default=f.default, doc=f.metadata.get("doc", ""),
            choices_name=f.metadata.get("choices_name", ""),
            nonempty=f.metadata.get("nonempty", False),
            default_doc=f.metadata.get("default_doc", ""), **rules,
        ))
    return tuple(specs)


def _kind_of(annotation: Any, where: str) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # `X | None`: None is a default only (TOML has no null), so the kind is X's.
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return _kind_of(rest[0], where)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] in (int, str, float):
            return f"{_SCALARS[args[0]]} list"
    raise TypeError(f"{where}: option type {annotation!r} has no TOML form")


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass, but `max_batch = true` is a slip
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float)
    return isinstance(value, str)


# ---------------------------------------------------------------------------- parsing


def check_options(cls: type, table: Mapping[str, Any] | None, key_prefix: str, *,
                  ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Check the keys and values of `table` against options class `cls` without building
    it: required options may be missing. Keys in `ignore` are skipped (options of other
    engines sharing the table). Returns the converted values by name; raises
    EngineOptionError (key ``f"{key_prefix}.{name}"``) for an unknown key or a bad value.
    """
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise EngineOptionError(key_prefix, table, "a table",
                                f"expected table, got {_toml_type(table)}")
    specs = {spec.name: spec for spec in option_specs(cls)}
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name in ignore:
            continue
        spec = specs.get(name)
        if spec is None:
            raise unknown_option_error(key_prefix, str(name), value, {"": list(specs)})
        values[name] = spec.check(f"{key_prefix}.{name}", value)
    return values


def parse_options(cls: type[T], table: Mapping[str, Any] | None, key_prefix: str, *,
                  ignore: frozenset[str] = frozenset()) -> T:
    """The options object of class `cls` built from TOML table `table` (None: no table).

    Every key must be an option of `cls` (keys in `ignore` are skipped), every value of
    the option's type and within its range, every required option present, and the class's
    own cross-option rules (`__post_init__`, raising OptionConflict) must hold. Otherwise
    raises EngineOptionError whose key is ``f"{key_prefix}.{name}"``.
    """
    values = check_options(cls, table, key_prefix, ignore=ignore)
    for spec in option_specs(cls):
        if spec.required and spec.name not in values:
            raise EngineOptionError(
                f"{key_prefix}.{spec.name}", None, spec.allowed(),
                f"is required ({spec.allowed()}): {spec.doc}",
            )
    try:
        return cls(**values)
    except OptionConflict as conflict:
        raise EngineOptionError(
            f"{key_prefix}.{conflict.name}", values.get(conflict.name), conflict.reason,
            conflict.reason,
        ) from None


def as_options(cls: type[T], options: T | Mapping[str, Any] | None, key_prefix: str) -> T:
    """`options` when it already is a `cls`, else `parse_options(cls, options, key_prefix)`:
    what an engine constructor calls on the options it is given (a typed object from
    `load_engine`, or a plain table from a test or a benchmark)."""
    if isinstance(options, cls):
        return options
    return parse_options(cls, options, key_prefix)  # type: ignore[arg-type]


def unknown_option_error(key_prefix: str, name: str, value: Any,
                         known: Mapping[str, Sequence[str]], hint: str = "") -> EngineOptionError:
    """The error for option `name` that no engine sharing the table declares. `known` maps
    a label ("tts embedded", or "" for a single engine) to its option names; `hint`
    replaces the did-you-mean drawn from them."""
    if not hint:
        every = sorted({option_name for names in known.values() for option_name in names})
        close = difflib.get_close_matches(name, every, n=1)
        hint = f"did you mean {close[0]}?" if close else ""
    hint = f" ({hint})" if hint else ""
    listing = "; ".join(
        f"{label}: {', '.join(names) or '(none)'}" if label else ", ".join(names)
        for label, names in known.items()
    )
    return EngineOptionError(
        f"{key_prefix}.{name}", value, listing,
        f"unknown option{hint}, got {_show(value)}; known options: {listing}",
    )


# ---------------------------------------------------------------------------- docs


def options_table_markdown(cls: type) -> str:
    """A Markdown table of the options of `cls`: option, type, default, range, meaning."""
    lines = ["| Option | Type | Default | Range | Meaning |", "| --- | --- | --- | --- | --- |"]
    # Required options first: they are what a reader must set.
    for spec in sorted(option_specs(cls), key=lambda spec: not spec.required):
        if spec.required:
            default = "required"
        elif spec.default is None:
            default = spec.default_doc or "unset"
        else:
            default = _toml_literal(spec.default)
        cells = [f"`{spec.name}`", spec.type_word, default, _rule_text(spec), spec.doc]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _rule_text(spec: OptionSpec) -> str:
    parts = []
    if spec.choices is not None:
        parts.append("one of " + ", ".join(f"`{c}`" for c in spec.choices))
    bounds = spec.range_text()
    if bounds:
        parts.append(bounds)
    if spec.multiple_of:
        parts.append("even" if spec.multiple_of == 2 else f"multiple of {spec.multiple_of}")
    if spec.nonempty:
        parts.append("not empty")
    text = "; ".join(parts) or "-"
    return f"each entry: {text}" if spec.kind.endswith("list") and parts else text


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(_toml_literal(v).strip("`") for v in value) + "]`"
    if isinstance(value, float):
        return f"`{value!r}`"
    return f"`{value}`"


# ---------------------------------------------------------------------------- helpers


def _number(bound: float) -> str:
    return f"{bound:g}"


def _toml_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."
