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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .base import EngineInputError

__all__ = [
    "EngineOptionError",
    "OptionConflict",
    "OptionSpec",
    "RequiredOptionError",
    "as_options",
    "check_options",
    "option",
    "option_specs",
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


class RequiredOptionError(EngineOptionError):
    """A required option missing from its table.

    `name`: the option; `engine`: what requires it ("tts engine coqui"; "" when the caller
    did not say); `places`: where it can be set, each a phrase that follows "Set it"
    ("in the config file under [engines.options.coqui] (model_dir = ...)"). The reason
    names all three, so an operator knows what to add and where.
    """

    def __init__(self, key: str, name: str, allowed: str, doc: str, engine: str = "",
                 places: Sequence[str] = ()):
        self.name = name
        self.engine = engine
        self.doc = doc
        self.places = tuple(places)
        by = f" by the {engine}" if engine else ""
        reason = f"is required{by} ({allowed}): {doc}"
        if self.places:
            sentence_end = "" if reason.endswith(".") else "."
            reason += f"{sentence_end} Set it {_either(self.places)}."
        super().__init__(key, None, allowed, reason)

    def with_places(self, *places: str) -> RequiredOptionError:
        """The same error with more places to set the option (e.g. command-line flags that
        only the daemon's CLI knows)."""
        return RequiredOptionError(self.key, self.name, self.allowed, self.doc, self.engine,
                                   (*self.places, *places))


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
    path: str = "",
    path_words: tuple[str, ...] = (),
) -> Any:
    """Declare one option field (use as ``name: int = option(16, "...", ge=1)``).

    `default`: the value when the table lacks the key (MISSING: required; None: decided
    by the engine at load time, explained by `default_doc`). `doc`: one line of meaning
    with units. `ge`/`gt`/`le`: bounds of a number, or of each entry of a list;
    `multiple_of`: a step for integers; `choices`: the strings allowed (for a list: for
    each entry), `choices_name` what they are ("engine kinds"); `nonempty`: a string
    must not be "". `path`: "file" or "dir": a string must name one that exists (checked
    when the config loads, so a typo'd path is a config error, not a worker's load
    failure), unless it is one of `path_words` (e.g. "random").
    """
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "multiple_of": multiple_of,
                "choices": choices, "choices_name": choices_name, "nonempty": nonempty,
                "default_doc": default_doc, "path": path, "path_words": path_words}
    if isinstance(default, list):  # a mutable default: store it as the tuple it parses to
        default = tuple(default)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------- specs

# The TOML scalar types an option (or each entry of a list option) can hold, and their names
# in "expected ..." messages (singular, plural).
_TYPE_NAMES: dict[type, tuple[str, str]] = {
    bool: ("bool", "bools"), int: ("int", "ints"), float: ("float", "floats"),
    str: ("str", "strings"),
}


@dataclass(frozen=True)
class OptionSpec:
    """One declared option: its name, value type, default and rules (see `option`)."""

    name: str
    value_type: type  # bool, int, float or str: of the value, or of each entry of a list
    is_list: bool  # a TOML array (a tuple in the options object)
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
    path: str = ""  # "file" | "dir": must exist (unless one of path_words)
    path_words: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def type_word(self) -> str:
        """The TOML type in words: "int", "list of ints"..."""
        singular, plural = _TYPE_NAMES[self.value_type]
        return f"list of {plural}" if self.is_list else singular

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
        if self.value_type is bool:
            return "true or false"
        if self.value_type is str:
            if self.path:
                what = "file" if self.path == "file" else "folder"
                words = "".join(f" or {w!r}" for w in self.path_words)
                return f"the path of an existing {what}{words}"
            if self.choices is None:
                return "a non-empty string" if self.nonempty else "a string"
            listed = f"one of {', '.join(self.choices)}"
            return f"{listed} ({self.choices_name})" if self.choices_name else listed
        noun = "a number" if self.value_type is float else "an integer"
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
        if self.is_list:
            return f"a list, each entry {self.entry_allowed()}"
        return self.entry_allowed()

    def check(self, key: str, value: Any) -> Any:
        """`value` converted to the field's type (float for an int given to a float, tuple
        for an array), or EngineOptionError naming `key`, the value and what is allowed."""
        if not self.is_list:
            if not self._has_type(value):
                raise self._type_error(key, value)
            problem = self._value_problem(value)
            if problem:
                raise EngineOptionError(key, value, self.allowed(), problem)
            return float(value) if self.value_type is float else value
        if not isinstance(value, list | tuple) or not all(map(self._has_type, value)):
            raise self._type_error(key, value)
        if any(self._value_problem(entry) for entry in value):
            raise EngineOptionError(
                key, value, self.allowed(),
                f"every entry must be {self.entry_allowed()}, got {_show(value)}",
            )
        return tuple(float(e) if self.value_type is float else e for e in value)

    def _has_type(self, value: Any) -> bool:
        if self.value_type is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):  # bool is an int subclass, but `max_batch = true` is a slip
            return False
        if self.value_type is float:
            return isinstance(value, int | float)  # TOML writes 2 for 2.0
        return isinstance(value, self.value_type)

    def _type_error(self, key: str, value: Any) -> EngineOptionError:
        return EngineOptionError(
            key, value, self.allowed(),
            f"must be {self.allowed()}; expected {self.type_word}, got "
            f"{_toml_type(value)} {_show(value)}",
        )

    def _value_problem(self, value: Any) -> str:
        """Why a value (or list entry) of the right type is still refused ("": it is not)."""
        if self.value_type is bool:
            return ""
        if self.value_type is str:
            if self.nonempty and not value:
                return "must not be empty"
            if self.path and value not in self.path_words:
                return self._path_problem(value)
            if self.choices is not None and value not in self.choices:
                close = difflib.get_close_matches(value, self.choices, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                return f"must be {self.entry_allowed()}, got {_show(value)}{hint}"
            return ""
        if self.value_type is float:
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

    def _path_problem(self, value: str) -> str:
        target = Path(value).expanduser()
        is_right = target.is_file() if self.path == "file" else target.is_dir()
        if is_right:
            return ""
        what = "file" if self.path == "file" else "folder"
        found = "is not a " + what if target.exists() else "does not exist"
        close = difflib.get_close_matches(value, self.path_words, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"must be {self.entry_allowed()}; {_show(value)} {found}{hint}"

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
        value_type, is_list = _toml_form(hints[f.name], f"{cls.__name__}.{f.name}")
        rules = {name: f.metadata.get(name) for name in
                 ("ge", "gt", "le", "multiple_of", "choices")}
        specs.append(OptionSpec(
            name=f.name, value_type=value_type, is_list=is_list, default=f.default,
            doc=f.metadata.get("doc", ""), choices_name=f.metadata.get("choices_name", ""),
            nonempty=f.metadata.get("nonempty", False),
            default_doc=f.metadata.get("default_doc", ""), path=f.metadata.get("path", ""),
            path_words=f.metadata.get("path_words", ()), **rules,
        ))
    return tuple(specs)


def _toml_form(annotation: Any, where: str) -> tuple[type, bool]:
    """(scalar type, is a list) of a field annotation: `int`, `tuple[int, ...]`, each
    optionally `| None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # `X | None`: None is a default only (TOML has no null), so the form is X's.
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return _toml_form(rest[0], where)
    if annotation in _TYPE_NAMES:
        return annotation, False
    if (typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis
            and args[0] in _TYPE_NAMES):
        return args[0], True
    raise TypeError(f"{where}: option type {annotation!r} has no TOML form")


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
                  ignore: frozenset[str] = frozenset(), engine: str = "",
                  places: Callable[[str], Sequence[str]] | None = None) -> T:
    """The options object of class `cls` built from TOML table `table` (None: no table).

    Every key must be an option of `cls` (keys in `ignore` are skipped), every value of
    the option's type and within its range, every required option present, and the class's
    own cross-option rules (`__post_init__`, raising OptionConflict) must hold. Otherwise
    raises EngineOptionError whose key is ``f"{key_prefix}.{name}"``; for a missing
    required option a RequiredOptionError naming `engine` ("tts engine coqui") and the
    places `places(option_name)` says it can be set.
    """
    values = check_options(cls, table, key_prefix, ignore=ignore)
    for spec in option_specs(cls):
        if spec.required and spec.name not in values:
            raise RequiredOptionError(
                f"{key_prefix}.{spec.name}", spec.name, spec.allowed(), spec.doc, engine,
                places(spec.name) if places is not None else (),
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


# ---------------------------------------------------------------------------- helpers


def _either(phrases: Sequence[str]) -> str:
    """"a", "a or b", "a, b, or c"."""
    if len(phrases) <= 2:
        return " or ".join(phrases)
    return f"{', '.join(phrases[:-1])}, or {phrases[-1]}"


def _number(bound: float) -> str:
    """Whole numbers in full (1048576, never 1.04858e+06); others as short as exact."""
    return str(int(bound)) if bound == int(bound) else repr(float(bound))


def _toml_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."
