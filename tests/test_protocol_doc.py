"""docs/protocol.md against the real message types: every example message in it is read
by the decoder the daemon or a client uses, so an example cannot drift from the structs
in ipc/protocol.py (a missing `v`, a renamed or forgotten field, a wrong type).

An example is any `{"type": ...}` map in the document: in inline code, in a fenced block
or in the indented exchange of the live-session example. A map that is JSON is encoded as
msgpack and decoded with `CLIENT_CODEC` (requests) or `SERVER_CODEC` (replies and events);
an example the text says is refused ("... gets `bad_version`/`v`") must be refused with
that code and field. A template (`"req_id": N`, `"session": str`) or an elided map (`...`)
is not JSON: it must still carry `v`, and name only fields its message type has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from avatard.ipc import protocol as P

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
REQUEST_TAGS = {cls.__struct_config__.tag: cls for cls in P.CLIENT_REQUESTS}
REPLY_TAGS = {cls.__struct_config__.tag: cls for cls in P.SERVER_REPLIES}
# The codec's own refusals; other codes (bad_input, not_found) are the daemon's checks of
# a message the codec accepts.
CODEC_CODES = {P.E_BAD_VERSION, P.E_UNKNOWN_TYPE, P.E_BAD_MESSAGE}
REFUSAL = re.compile(r"\s*(?:\([^)]*\)\s*)?gets `([a-z_]+)`/`([a-z_.]+)`")


def _maps(text: str) -> list[tuple[str, int]]:
    """Every balanced `{"type": ...}` map in `text` with its end offset, the indentation
    and line breaks of a wrapped example joined."""
    found = []
    for start in (m.start() for m in re.finditer(r'\{"type"', text)):
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found.append((re.sub(r"\s*\n\s*", " ", text[start : end + 1]), end + 1))
                break
    return found


EXAMPLES = _maps(DOC.read_text(encoding="utf-8"))


def _type_of(example: str) -> str:
    match = re.match(r'\{"type": "([a-z_]+)"', example)
    assert match, example
    return match.group(1)


def test_the_document_has_examples_of_requests_and_replies():
    types = {_type_of(e) for e, _ in EXAMPLES}
    assert {
        "hello",
        "welcome",
        "busy",
        "accepted",
        "voices_reply",
        "warning",
        "live_open",
        "done",
        "error",
    } <= types, sorted(types)


@pytest.mark.parametrize(("example", "end"), EXAMPLES, ids=[e[:48] for e, _ in EXAMPLES])
def test_every_example_decodes_with_the_real_codec(example, end):
    text = DOC.read_text(encoding="utf-8")
    kind = _type_of(example)
    refused = REFUSAL.match(text[end:].lstrip("`"))
    try:
        body = json.loads(example)
    except json.JSONDecodeError:
        body = None
    if body is None:
        # A template or an elided map: `v` and only fields of its type.
        assert '"v": 2' in example, f"no v in {example}"
        cls = REQUEST_TAGS.get(kind) or REPLY_TAGS.get(kind)
        assert cls is not None, f"{kind} is no message type"
        top, depth = [], 0  # the map's own keys, not those of maps inside it
        for ch in example:
            depth += {"{": 1, "}": -1}.get(ch, 0)
            top.append(ch if depth == 1 else " ")
        named = set(re.findall(r'"([a-z_]+)":', "".join(top))) - {"type"}
        unknown = named - set(cls.__struct_fields__)
        assert not unknown, f"{kind} has no field {sorted(unknown)}: {example}"
        return
    codec = P.CLIENT_CODEC if kind in REQUEST_TAGS or kind not in REPLY_TAGS else P.SERVER_CODEC
    parts = [msgspec.msgpack.encode(body)]
    if refused and refused.group(1) in CODEC_CODES:
        with pytest.raises(P.ProtocolError) as caught:
            codec.decode(parts)
        assert (caught.value.code, caught.value.field) == refused.groups(), example
        return
    msg, _ = codec.decode(parts)
    assert type(msg).__struct_config__.tag == kind
    assert msg.v == P.PROTOCOL_VERSION
