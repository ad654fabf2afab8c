"""The `frames` response format of `POST /v1/render` and `/v1/lipsync`
(`application/x-avatard-frames`): a stream of records, each a 4-byte big-endian length and
then that many bytes of one msgpack map. Records, in order:

- `start` {seed, fps, width, height, audio_rate}: once, when the first node accepted;
- `frame` {index, shape: [h, w, 3], data: bytes (uint8 RGB)}: every index once, in order;
- `audio` {index, sample_rate, data: bytes (float32 mono)}: `render` with audio;
- the last one: `done` {frames, attempts, nodes, wall_s and ingress_first_frame_s (at the
  ingress, from the start of the response), first_frame_s and daemon_wall_s (as the last
  node's daemon measured them)} or `error` {code, field, message}.

Any language with msgpack reads it; `read_records` does so in Python.

The live WebSocket (`/v1/live`) has its messages here too: the binary media header and
the JSON messages a client sends (`LiveOpen`, `LiveAudio`... tagged by `type`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO

import msgspec

MEDIA_TYPE = "application/x-avatard-frames"
MAX_RECORD_BYTES = 256 * 1024 * 1024  # a frame of 8192 x 8192 RGB is 201 MB

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)


def record(kind: str, **fields: Any) -> bytes:
    """One record of type `kind` with `fields`, length prefix included."""
    body = _encoder.encode({"type": kind, **fields})
    return struct.pack(">I", len(body)) + body


def read_records(stream: BinaryIO) -> Iterator[dict[str, Any]]:
    """The records of a `frames` response body read from `stream`, as dicts. Raises
    ValueError for a record cut short or over MAX_RECORD_BYTES."""
    while True:
        head = stream.read(4)
        if not head:
            return
        if len(head) < 4:
            raise ValueError("the stream ends inside a record's length")
        (size,) = struct.unpack(">I", head)
        if size > MAX_RECORD_BYTES:
            raise ValueError(f"record of {size} bytes; max {MAX_RECORD_BYTES}")
        body = stream.read(size)
        if len(body) < size:
            raise ValueError(f"the stream ends inside a record ({len(body)} of {size} bytes)")
        yield _decoder.decode(body)


# ---------------------------------------------------------------------- live WebSocket
# `/v1/live` (docs/cluster.md, "Live sessions over a WebSocket"): JSON text messages for
# control, binary messages for media. Media from the ingress starts with LIVE_HEADER
# (little-endian, 28 bytes):
#   offset 0  u8   kind: LIVE_FRAME (1) or LIVE_AUDIO (2)
#          1  u8   header version: LIVE_HEADER_VERSION (1)
#          2  2 bytes zero
#          4  u32  frame: height; audio: sample rate (Hz)
#          8  u32  frame: width;  audio: samples
#         12  u64  index (the session's frame period; audio k plays with frame k)
#         20  u64  pts_us (microseconds on the session's clock)
#   then the payload: frame height x width x 3 uint8 RGB, row-major; audio float32 mono.
# Audio from the client has no header: a `live_audio` JSON message announces it and the
# next message is its float32 little-endian PCM.

LIVE_HEADER = struct.Struct("<BB2xIIQQ")
LIVE_HEADER_VERSION = 1
LIVE_FRAME = 1
LIVE_AUDIO = 2
LIVE_SEGMENT_MAX_CHARS = 256
LIVE_TEXT_MAX_CHARS = 100_000


def live_frame_message(index: int, pts_us: int, shape: tuple[int, ...], data: bytes) -> bytes:
    """A binary frame message: header + `data` ((h, w, 3) uint8 RGB bytes)."""
    height, width = shape[0], shape[1]
    return LIVE_HEADER.pack(LIVE_FRAME, LIVE_HEADER_VERSION, height, width, index, pts_us) + data


def live_audio_message(index: int, pts_us: int, sample_rate: int, data: bytes) -> bytes:
    """A binary audio message: header + `data` (float32 mono bytes)."""
    samples = len(data) // 4
    return (
        LIVE_HEADER.pack(LIVE_AUDIO, LIVE_HEADER_VERSION, sample_rate, samples, index, pts_us)
        + data
    )


def parse_live_media(message: bytes) -> dict[str, Any]:
    """A binary message from the ingress as a dict: ``{"kind": "frame", "index",
    "pts_us", "array": (h, w, 3) uint8}`` or ``{"kind": "audio", "index", "pts_us",
    "sample_rate", "pcm": float32 (n,)}`` (arrays are read-only views of `message`).
    Raises ValueError for a short message, an unknown kind or version, or a payload whose
    size does not match the header."""
    import numpy as np

    if len(message) < LIVE_HEADER.size:
        raise ValueError(f"binary message of {len(message)} bytes: shorter than the header")
    kind, version, a, b, index, pts_us = LIVE_HEADER.unpack_from(message)
    if version != LIVE_HEADER_VERSION:
        raise ValueError(f"header version {version}, expected {LIVE_HEADER_VERSION}")
    payload = memoryview(message)[LIVE_HEADER.size :]
    if kind == LIVE_FRAME:
        if len(payload) != a * b * 3:
            raise ValueError(f"frame {a}x{b}x3 needs {a * b * 3} bytes, got {len(payload)}")
        array = np.frombuffer(payload, np.uint8).reshape(a, b, 3)
        return {"kind": "frame", "index": index, "pts_us": pts_us, "array": array}
    if kind == LIVE_AUDIO:
        if len(payload) != 4 * b:
            raise ValueError(f"{b} samples need {4 * b} bytes, got {len(payload)}")
        pcm = np.frombuffer(payload, "<f4")
        return {"kind": "audio", "index": index, "pts_us": pts_us, "sample_rate": a, "pcm": pcm}
    raise ValueError(f"unknown media kind {kind}")


SegmentId = Annotated[str, msgspec.Meta(min_length=1, max_length=LIVE_SEGMENT_MAX_CHARS)]
ReqId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class LiveOpen(msgspec.Struct, tag="live_open", forbid_unknown_fields=True):
    """The first message of a session: `avatar_id`, `voice`, `seed` (0: one chosen by
    the ingress, kept when the session moves), the daemon's session options."""

    avatar_id: str = ""
    voice: str = ""
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    prebuffer_ms: Annotated[int, msgspec.Meta(ge=0, le=5000)] = 0
    render_ahead_frames: Annotated[int, msgspec.Meta(ge=-1, le=250)] = -1


class LiveAudio(msgspec.Struct, tag="live_audio", forbid_unknown_fields=True):
    """Speech for `segment_id`: the next message is its float32 PCM at `sample_rate`."""

    segment_id: SegmentId
    sample_rate: Annotated[int, msgspec.Meta(ge=8000, le=192000)]
    req_id: ReqId | None = None  # given back only when given


class LiveText(msgspec.Struct, tag="live_text", forbid_unknown_fields=True):
    """Text for `segment_id`, spoken sentence by sentence; `final` ends the segment."""

    segment_id: SegmentId
    text: Annotated[str, msgspec.Meta(max_length=LIVE_TEXT_MAX_CHARS)]
    final: bool = False
    req_id: ReqId | None = None  # given back only when given


class LiveEnd(msgspec.Struct, tag="live_end", forbid_unknown_fields=True):
    """No more input for `segment_id`."""

    segment_id: SegmentId
    req_id: ReqId | None = None  # given back only when given


class LiveInterrupt(msgspec.Struct, tag="live_interrupt", forbid_unknown_fields=True):
    """Barge-in: drop all queued speech."""

    req_id: ReqId | None = None  # given back only when given


class LiveClose(msgspec.Struct, tag="live_close", forbid_unknown_fields=True):
    """End the session: `done` follows, then the ingress closes the WebSocket."""

    req_id: ReqId | None = None  # given back only when given


def field_of(error: msgspec.ValidationError) -> str:
    """The field a msgspec validation error names (``"seed"``, ``"options.x"``, ``"type"``
    for an unknown message type), or ``"message"`` when it names none."""
    text = str(error)
    # msgspec says "... - at `$.seed`", or names the field: "unknown field `colour`".
    at = re.search(r" - at `\$\.([^`]+)`", text) or re.search(r"field `([^`]+)`", text)
    return at.group(1) if at else "message"


def req_id_of(text: str) -> int | None:
    """The `req_id` of a JSON message that did not pass its checks, to give back in the
    `error` about it; None when it has none (or no valid one, or is not a JSON object)."""
    try:
        fields = msgspec.json.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    req_id = fields.get("req_id") if isinstance(fields, dict) else None
    ok = isinstance(req_id, int) and not isinstance(req_id, bool) and 0 <= req_id <= 2**53
    return req_id if ok else None


LiveInput = LiveAudio | LiveText | LiveEnd | LiveInterrupt | LiveClose
LiveMessage = LiveOpen | LiveInput
live_decoder = msgspec.json.Decoder(LiveMessage)
