"""Coverage-guided fuzzing of the protocol decoder with atheris (libFuzzer), as a script:

    pip install atheris
    python tests/test_fuzz_atheris.py -max_total_time=600 [corpus_dir]

Any exception other than `ProtocolError` out of `CLIENT_CODEC.decode` is a finding (the
supervisor's receive loop catches only that one). Known finding at the time of writing:
values nested ~1000 deep were the first bug it looked for (see test_fuzz_protocol.py);
AVATARD_FUZZ_IGNORE_RECURSION=1 skips that class of input.

Under pytest (CI) only the target itself runs, over a small fixed corpus: atheris is not
needed for that.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec
import pytest

from avatard.ipc import protocol as P

V = P.PROTOCOL_VERSION  # the version every well-formed message carries

IGNORE_RECURSION = os.environ.get("AVATARD_FUZZ_IGNORE_RECURSION") == "1"


def split_parts(data: bytes) -> list[bytes]:
    """The first byte picks how many parts (1..9, one more than allowed); the rest is
    cut into that many pieces at offsets given by the following bytes."""
    if not data:
        return [b""]
    count = data[0] % 9 + 1
    body = data[1 + count:]
    cuts = sorted(b * len(body) // 256 for b in data[1:1 + count - 1])
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:], strict=False)] or [b""]


def one_input(data: bytes) -> None:
    """The fuzz target: decode; a ProtocolError must carry a valid reply."""
    try:
        P.CLIENT_CODEC.decode(split_parts(data))
    except P.ProtocolError as exc:
        reply = exc.reply()
        assert reply.code and reply.field and reply.rule, exc
    except RecursionError:
        if not IGNORE_RECURSION:
            raise


ENC = msgspec.msgpack.Encoder()
CORPUS = [
    b"",
    b"\x00" + ENC.encode({"type": "health", "v": V, "req_id": 1}),
    b"\x00" + ENC.encode({"type": "speak", "v": V, "req_id": 2, "text": "hi"}),
    b"\x01\x80" + ENC.encode({"type": "register_avatar", "v": V, "req_id": 3,
                              "image": {"at": "inline", "part": 1, "shape": [3],
                                        "dtype": "uint8"}}) + b"abc",
    b"\x00\x84\xa4type\xa5speak\xa1v" + bytes([V]) + b"\xa6req_id\x10\xa4text\xa2\xff\xfe",
    b"\x08" + bytes(range(64)),
    b"\x00" + ENC.encode([1, 2, {"type": "health"}]),
]


@pytest.mark.parametrize("data", CORPUS)
def test_fuzz_target_on_the_seed_corpus(data: bytes) -> None:
    one_input(data)


def main() -> None:
    import atheris

    # An empty corpus folder gets the seed corpus: random bytes rarely form a msgpack map.
    for arg in sys.argv[1:]:
        folder = Path(arg)
        if not arg.startswith("-") and folder.is_dir() and not any(folder.iterdir()):
            for i, data in enumerate(CORPUS):
                (folder / f"seed-{i}").write_bytes(data)
    atheris.instrument_all()  # coverage feedback from the (already imported) Python code
    atheris.Setup(sys.argv, lambda data: one_input(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
