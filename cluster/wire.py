"""The `frames` response format of `POST /v1/render` and `/v1/lipsync`
(`application/x-avatard-frames`): a stream of records, each a 4-byte big-endian length and
then that many bytes of one msgpack map. Records, in order:

- `start` {seed, fps, width, height, audio_rate}: once, when the first node accepted;
- `frame` {index, shape: [h, w, 3], data: bytes (uint8 RGB)}: every index once, in order;
- `audio` {index, sample_rate, data: bytes (float32 mono)}: `render` with audio;
- the last one: `done` {frames, attempts, nodes, wall_s, first_frame_s} or `error`
  {code, field, message}.

Any language with msgpack reads it; `read_records` does so in Python.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

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
