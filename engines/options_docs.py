"""The engine options reference in the docs, generated from the options classes.

docs/config.md and docs/engines.md hold blocks between
``<!-- BEGIN GENERATED: engine_options_markdown(ARGS) -->`` and
``<!-- END GENERATED: engine_options_markdown -->`` (an end marker of its own, so it never
closes the config key reference block of docs/config.md);
each block's body is `engine_options_markdown(ARGS)`. A test checks the blocks are current;
``python -m avatard.engines.options_docs FILE...`` rewrites them in place.

Torch-free like the options classes it reads.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

from .options import OptionSpec, option_specs
from .registry import ENGINES, engine_kinds, engine_options_class, options_key_prefix

BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED: engine_options_markdown\((?P<args>[^)]*)\) -->\n)"
    r"(?P<body>.*?)(?P<end><!-- END GENERATED: engine_options_markdown -->)",
    re.DOTALL,
)
KIND_TITLES = {"avatar": "Avatar", "tts": "TTS", "asr": "ASR"}


def engine_options_markdown(kind: str | None = None, name: str | None = None) -> str:
    """Markdown for the options of engine `name` of `kind` (its summary and table), or,
    with no arguments, for every options table: a heading per `[engines.options.<name>]`
    and a part per options class (the fake engines share one). Raises KeyError for an
    unknown kind or name."""
    if kind is not None and name is not None:
        cls = engine_options_class(kind, name)
        sharing = [k for k in engine_kinds(name) if engine_options_class(k, name) is cls]
        return _engine_part(kind, name, sharing)
    parts = []
    names = sorted({engine for table in ENGINES.values() for engine in table})
    for engine in names:
        parts.append(f"### `[{options_key_prefix(engine)}]`\n")
        kinds_of_class: dict[type, list[str]] = {}
        for engine_kind in engine_kinds(engine):
            cls = engine_options_class(engine_kind, engine)
            kinds_of_class.setdefault(cls, []).append(engine_kind)
        for class_kinds in kinds_of_class.values():
            parts.append(_engine_part(class_kinds[0], engine, class_kinds))
    return "\n".join(parts)


def _engine_part(kind: str, name: str, kinds: list[str]) -> str:
    cls = engine_options_class(kind, name)
    owner = ", ".join(KIND_TITLES[k] for k in kinds)
    plural = "s" if len(kinds) > 1 else ""
    summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    return (f"{owner} engine{plural} `{name}` (`{cls.__name__}`): {summary}\n\n"
            f"{options_table_markdown(cls)}")


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
    return f"each entry: {text}" if spec.is_list and parts else text


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


def refresh_generated_blocks(text: str) -> str:
    """`text` with the body of every generated block replaced by its current rendering."""

    def render(match: re.Match[str]) -> str:
        args = ast.literal_eval(f"({match['args']},)") if match["args"].strip() else ()
        return f"{match['begin']}{engine_options_markdown(*args)}{match['end']}"

    return BLOCK.sub(render, text)


def _main(paths: list[str]) -> int:
    if not paths:
        print(engine_options_markdown(), end="")
        return 0
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        fresh = refresh_generated_blocks(text)
        if fresh != text:
            path.write_text(fresh, encoding="utf-8")
            print(f"{path}: regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
