"""The control-plane protocol: every malformed message gets an error reply naming the field
and the rule, over a real ZeroMQ ROUTER socket, and the receiver keeps serving."""

from __future__ import annotations

import os
import stat
import threading

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from avatard.ipc import protocol as P
from avatard.ipc.sockets import ClientPort

V = P.PROTOCOL_VERSION  # the version every well-formed message carries

ENC = msgspec.msgpack.Encoder()

# (message, expected code, expected field, words expected in the rule)
MALFORMED = [
    ({"type": "teleport", "v": V, "req_id": 4}, P.E_UNKNOWN_TYPE, "type", "must be one of"),
    ({"type": "health", "v": 99, "req_id": 5}, P.E_BAD_VERSION, "v", f"must be {V}, got 99"),
    ({"type": "health", "req_id": 6}, P.E_BAD_VERSION, "v", "got None"),
    ({"type": "speak", "v": V, "req_id": 7}, P.E_BAD_MESSAGE, "text", "missing required field"),
    ({"type": "speak", "v": V, "req_id": 8, "text": 5}, P.E_BAD_MESSAGE, "text", "Expected `str`"),
    ({"type": "speak", "v": V, "req_id": 9, "text": "x" * (P.MAX_TEXT_CHARS + 1)},
     P.E_BAD_MESSAGE, "text", "length <= 100000"),
    ({"type": "speak", "v": V, "req_id": 10, "text": "hi", "extra": 1}, P.E_BAD_MESSAGE,
     "extra", "unknown field"),
    ({"type": "speak", "v": V, "req_id": 11, "text": "hi", "seed": -3}, P.E_BAD_MESSAGE,
     "seed", ">= 0"),
    ({"type": "lipsync", "v": V, "req_id": 12, "sample_rate": 16000,
      "audio": {"at": "shm", "ring": "r", "slot": 0, "seq": 1, "shape": [10], "dtype": "object"}},
     P.E_BAD_MESSAGE, "audio.dtype", "matching regex"),
    ({"type": "lipsync", "v": V, "req_id": 13, "sample_rate": 16000,
      "audio": {"at": "shm", "ring": "r", "slot": 0, "seq": 1, "shape": [1, 2, 3, 4, 5],
                "dtype": "float32"}}, P.E_BAD_MESSAGE, "audio.shape", "length <= 4"),
    ({"type": "lipsync", "v": V, "req_id": 14, "sample_rate": 16000,
      "audio": {"at": "shm", "ring": "r", "slot": -1, "seq": 1, "shape": [4],
                "dtype": "float32"}}, P.E_BAD_MESSAGE, "audio.slot", ">= 0"),
    ({"type": "lipsync", "v": V, "req_id": 15, "sample_rate": 1,
      "audio": {"at": "inline", "part": 1, "shape": [4], "dtype": "float32"}},
     P.E_BAD_MESSAGE, "sample_rate", ">= 8000"),
]


def _raw(obj) -> bytes:
    return ENC.encode(obj)


# A speak message whose text is not UTF-8 (msgpack str with bytes ff fe).
BAD_UTF8 = b"\x84\xa4type\xa5speak\xa1v" + bytes([V]) + b"\xa6req_id\x10\xa4text\xa2\xff\xfe"


@pytest.mark.parametrize(("obj", "code", "field", "words"), MALFORMED)
def test_codec_names_field_and_rule(obj, code, field, words):
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode([_raw(obj)])
    reply = err.value.reply()
    assert (reply.code, reply.field) == (code, field)
    assert words in reply.rule
    assert reply.req_id == obj["req_id"]


def test_non_utf8_text_names_the_field():
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode([BAD_UTF8])
    assert (err.value.field, err.value.rule, err.value.req_id) == ("text", "must be valid UTF-8",
                                                                  16)


def test_oversize_parts_are_refused_before_decoding():
    big = b"\x00" * (P.MAX_CONTROL_BYTES + 1)
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode([big])
    assert err.value.code == P.E_TOO_LARGE and "max 1048576" in err.value.rule
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode([_raw({"type": "health", "v": V, "req_id": 1})] * 9)
    assert err.value.code == P.E_TOO_LARGE and err.value.field == "message"


LIVE_MALFORMED = [
    ({"type": "live_audio", "v": V, "req_id": 20, "job_id": "j", "segment_id": "",
      "sample_rate": 16000, "audio": {"at": "inline", "part": 1, "shape": [4],
                                      "dtype": "float32"}},
     "segment_id", "length >= 1"),
    ({"type": "live_text", "v": V, "req_id": 21, "job_id": "j", "segment_id": "s"},
     "text", "missing required field"),
    ({"type": "live_end", "v": V, "req_id": 22, "job_id": "j"}, "segment_id",
     "missing required field"),
    ({"type": "live_open", "v": V, "req_id": 23, "seed": -1}, "seed", ">= 0"),
    ({"type": "live_interrupt", "v": V, "req_id": 24, "job_id": 5}, "job_id",
     "Expected `str`"),
]


@pytest.mark.parametrize(("obj", "field", "words"), LIVE_MALFORMED)
def test_live_requests_name_the_bad_field(obj, field, words):
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode([_raw(obj)])
    assert (err.value.code, err.value.field) == (P.E_BAD_MESSAGE, field)
    assert words in err.value.rule and err.value.req_id == obj["req_id"]


def test_live_events_and_worker_messages_round_trip():
    for codec, msg, parts in [
        (P.SERVER_CODEC, P.make(P.PlaybackStarted, job_id="j", segment_id="s"), ()),
        (P.SERVER_CODEC, P.make(P.PlaybackFinished, job_id="j", segment_id="s",
                                position_s=1.25, interrupted=True), ()),
        (P.SERVER_CODEC, P.make(P.Done, job_id="j", frames=9, frames_dropped=2,
                                late_frames=1), ()),
        (P.WORKER_CODEC, P.make(P.WPlaybackFinished, job_id="j", segment_id="s",
                                position_s=0.5), ()),
        (P.CONTROL_CODEC, P.make(P.LiveInput, job_id="j", kind=P.LiveInputKind.AUDIO,
                                 segment_id="s", sample_rate=16000), (b"\0" * 8,)),
        (P.CONTROL_CODEC, P.make(P.RunJob, job_id="j", seed=1, attempt=1,
                                 spec=P.LiveSpec(voice="v")), ()),
    ]:
        decoded, extra = codec.decode(P.Codec.encode(msg, *parts))
        assert decoded == msg and extra == list(parts)


def test_messages_of_another_direction_are_unknown_here():
    worker_msg = P.Codec.encode(P.make(P.WHeartbeat, rss_bytes=1))
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode(worker_msg)
    assert err.value.code == P.E_UNKNOWN_TYPE


def test_round_trip_of_every_client_request():
    slot = P.SlotDesc(ring="avatard-1-1-0123456789abcdef-in", slot=1, seq=2, shape=[16000],
                      dtype="float32")
    messages = [
        P.make(P.Hello, req_id=1, client="t", inline=True),
        P.make(P.Health, req_id=2),
        P.make(P.Stats, req_id=3),
        P.make(P.RegisterAvatar, req_id=4, image=P.Inline(part=1, shape=[10], dtype="uint8")),
        P.make(P.Speak, req_id=5, text="héllo wörld", voice="v", avatar_id="a", seed=3),
        P.make(P.Lipsync, req_id=6, audio=slot, sample_rate=16000),
        P.make(P.Transcribe, req_id=7, audio=slot, sample_rate=22050),
        P.make(P.Cancel, req_id=8, job_id="j1"),
        P.make(P.Release, req_id=9, ring=slot.ring, slot=1, seq=2),
        P.make(P.Bye, req_id=10),
        P.make(P.LiveOpen, req_id=11, avatar_id="a", voice="v", seed=4),
        P.make(P.LiveAudio, req_id=12, job_id="j1", segment_id="s1", audio=slot,
               sample_rate=48000),
        P.make(P.LiveText, req_id=13, job_id="j1", segment_id="s2", text="Hi. ", final=True),
        P.make(P.LiveEnd, req_id=14, job_id="j1", segment_id="s1"),
        P.make(P.LiveInterrupt, req_id=15, job_id="j1"),
        P.make(P.LiveClose, req_id=16, job_id="j1"),
    ]
    for msg in messages:
        decoded, extra = P.CLIENT_CODEC.decode(P.Codec.encode(msg, b"payload"))
        assert decoded == msg
        assert extra == [b"payload"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_error(data):
    try:
        P.CLIENT_CODEC.decode([data])
    except P.ProtocolError as exc:
        assert exc.reply().code in {P.E_BAD_MESSAGE, P.E_UNKNOWN_TYPE, P.E_BAD_VERSION}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "v", "req_id", "text", "seed", "audio",
                                        "sample_rate", "job_id", "image", "zzz"]),
                       st.one_of(st.none(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20),
                                 st.sampled_from(["speak", "health", "lipsync", "cancel"]),
                                 st.just(1), st.lists(st.integers(-2**63, 2**63), max_size=5),
                                 st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63),
                                                 max_size=3))))
def test_random_maps_decode_or_name_a_field(obj):
    try:
        P.CLIENT_CODEC.decode([_raw(obj)])
    except P.ProtocolError as exc:
        assert exc.field, f"no field named for {obj}: {exc}"


# --------------------------------------------------------------- over a real socket


class _Server(threading.Thread):
    """The daemon's ClientPort answering Health, so malformed traffic can be interleaved
    with good requests over a real ROUTER socket."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.port = ClientPort(self.ctx, endpoint)
        self.stop = threading.Event()
        self.served = 0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.port.sock, zmq.POLLIN)
        while not self.stop.is_set():
            if poller.poll(50):
                for identity, msg, _extra in self.port.receive():
                    if isinstance(msg, P.Health):
                        self.served += 1
                        self.port.send(identity, P.make(P.HealthReply, req_id=msg.req_id,
                                                        status="ready", ready_workers=1,
                                                        workers=1))
        self.port.close()
        self.ctx.term()


@pytest.fixture
def server(tmp_path):
    srv = _Server(f"ipc://{tmp_path}/run/avatard.sock")
    srv.start()
    yield srv
    srv.stop.set()
    srv.join(timeout=5)


def _client(server) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(server.port.endpoints[0])
    return sock


def test_ipc_socket_is_owner_only(server):
    path = server.port.endpoints[0][len("ipc://"):]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_every_malformed_message_gets_an_error_reply_and_serving_goes_on(server):
    sock = _client(server)
    cases = [(_raw(obj), code, field) for obj, code, field, _ in MALFORMED]
    cases += [(BAD_UTF8, P.E_BAD_MESSAGE, "text"), (b"\xc1garbage", P.E_BAD_MESSAGE, "message"),
              (b"\x00" * (P.MAX_CONTROL_BYTES + 1), P.E_TOO_LARGE, "message")]
    for i, (raw, code, field) in enumerate(cases):
        sock.send(raw)
        reply, _ = P.SERVER_CODEC.decode(sock.recv_multipart())
        assert isinstance(reply, P.Error)
        assert (reply.code, reply.field) == (code, field), raw[:60]
        # A good request right after each bad one is still served.
        sock.send_multipart(P.Codec.encode(P.make(P.Health, req_id=1000 + i)))
        good, _ = P.SERVER_CODEC.decode(sock.recv_multipart())
        assert isinstance(good, P.HealthReply) and good.req_id == 1000 + i
    assert server.port.bad_messages == len(cases)
    assert server.served == len(cases)
    sock.close()


def test_clients_ignore_unknown_fields_in_replies_but_requests_stay_strict():
    """From v2 the daemon may add fields to replies and events without a version bump:
    clients skip what they do not know. Requests with an unknown field are refused."""
    import msgspec

    reply = msgspec.msgpack.encode({
        "type": "accepted", "v": P.PROTOCOL_VERSION, "req_id": 1, "job_id": "j1",
        "queue_position": 0, "fps": 25, "width": 8, "height": 8, "audio_rate": 0,
        "added_later": [1, 2]})
    msg, _ = P.SERVER_CODEC.decode([reply])
    assert isinstance(msg, P.Accepted) and msg.job_id == "j1"
    request = msgspec.msgpack.encode({"type": "health", "v": P.PROTOCOL_VERSION,
                                      "req_id": 2, "added_later": 1})
    with pytest.raises(P.ProtocolError) as err:
        P.CLIENT_CODEC.decode([request])
    assert err.value.field == "added_later"
    for cls in P.SERVER_REPLIES:
        assert issubclass(cls, P.Reply), cls


def test_shm_payloads_named_by_a_refused_request():
    # What the daemon reads from a request its decoder refused, to give the slot back.
    bad = msgspec.msgpack.encode({"type": "live_audio", "v": 2, "req_id": 3,
                                  "sample_rate": 0, "audio": {"at": "shm", "ring": "r",
                                                              "slot": 2, "seq": 9}})
    assert P.shm_payloads_named(bad) == [("r", 2, 9)]
    for junk in (b"", b"\xc1", msgspec.msgpack.encode([1, 2]),
                 msgspec.msgpack.encode({"audio": {"at": "inline", "part": 1}}),
                 msgspec.msgpack.encode({"audio": {"at": "shm", "ring": "r", "slot": -1,
                                                   "seq": 1}}),
                 msgspec.msgpack.encode({"image": {"at": "shm", "ring": 5, "slot": 1,
                                                   "seq": True}})):
        assert P.shm_payloads_named(junk) == []
