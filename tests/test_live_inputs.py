"""Unit tests of daemon/live_inputs.py: the supervisor's checks of live-session input and
the worker messages it makes. Pure bookkeeping: no sockets, no processes."""

from __future__ import annotations

import pytest

from avatard.daemon.live_inputs import LiveInputs
from avatard.ipc import protocol as P

INLINE = P.Inline(part=1, shape=[4], dtype="float32")
K = P.LiveInputKind


def audio(segment: str, rate: int = 16000, req_id: int = 1) -> P.LiveAudio:
    return P.make(P.LiveAudio, req_id=req_id, job_id="j", segment_id=segment, audio=INLINE,
                  sample_rate=rate)


def text(segment: str, final: bool = False) -> P.LiveText:
    return P.make(P.LiveText, req_id=2, job_id="j", segment_id=segment, text="Hi. ",
                  final=final)


def end(segment: str) -> P.LiveEnd:
    return P.make(P.LiveEnd, req_id=3, job_id="j", segment_id=segment)


def refused(live: LiveInputs, msg) -> tuple[str, str]:
    with pytest.raises(P.ProtocolError) as err:
        live.take("j", msg)
    assert err.value.req_id == msg.req_id
    return err.value.code, err.value.field


def opened() -> LiveInputs:
    live = LiveInputs()
    live.open("j")
    return live


def test_input_becomes_the_workers_message_in_order():
    live = opened()
    assert live.take("j", audio("a", 48000)) == P.make(
        P.LiveInput, job_id="j", kind=K.AUDIO, segment_id="a", sample_rate=48000)
    out = live.take("j", text("t", final=True))
    assert (out.kind, out.segment_id, out.text, out.final) == (K.TEXT, "t", "Hi. ", True)
    assert live.take("j", end("t")) is None  # ended by its final text already
    assert live.take("j", P.make(P.LiveInterrupt, req_id=4, job_id="j")).kind is K.INTERRUPT
    assert live.take("j", P.make(P.LiveClose, req_id=5, job_id="j")).kind is K.CLOSE


def test_segment_rules_name_the_field():
    live = opened()
    live.take("j", audio("a"))
    assert refused(live, audio("a", 22050, req_id=9)) == (P.E_BAD_INPUT, "sample_rate")
    assert refused(live, text("a")) == (P.E_BAD_INPUT, "segment_id")  # audio segment
    live.take("j", text("b"))  # a new segment ends "a"
    assert refused(live, audio("a")) == (P.E_BAD_INPUT, "segment_id")
    assert live.take("j", end("b")).kind is K.END
    assert refused(live, text("b")) == (P.E_BAD_INPUT, "segment_id")
    assert live.take("j", end("never-spoke")).kind is K.END  # harmless: passed on
    assert refused(live, audio("never-spoke")) == (P.E_BAD_INPUT, "segment_id")


def test_barge_in_ends_every_known_segment_and_close_ends_all_input():
    live = opened()
    live.take("j", audio("a"))
    live.take("j", P.make(P.LiveInterrupt, req_id=4, job_id="j"))
    assert refused(live, audio("a")) == (P.E_BAD_INPUT, "segment_id")
    assert live.take("j", audio("b")).segment_id == "b"
    live.take("j", P.make(P.LiveClose, req_id=5, job_id="j"))
    assert refused(live, audio("c")) == (P.E_BAD_MESSAGE, "job_id")
    with pytest.raises(P.ProtocolError) as err:
        live.check_open("j", 7)
    assert "closing" in err.value.rule


def test_a_job_that_is_not_a_live_session_is_refused():
    live = LiveInputs()
    assert refused(live, audio("a")) == (P.E_BAD_MESSAGE, "job_id")
    live.open("j")
    live.forget("j")
    assert "j" not in live


def test_input_held_before_placement_is_bounded_and_given_back_in_order():
    live = LiveInputs(max_held=2, max_held_bytes=100)
    live.open("j")
    first, second = live.take("j", audio("a")), live.take("j", end("a"))
    live.check_room("j", 64, 1)
    live.hold("j", first, b"\0" * 64)
    with pytest.raises(P.ProtocolError) as err:
        live.check_room("j", 64, 2)  # 128 bytes > 100
    assert (err.value.code, err.value.field, err.value.req_id) == (P.E_BUSY, "job_id", 2)
    live.check_room("j", 0, 3)
    live.hold("j", second, b"")
    with pytest.raises(P.ProtocolError):
        live.check_room("j", 0, 4)  # a third input > 2
    assert live.held("j") == [(first, b"\0" * 64), (second, b"")]
    assert live.held("j") == []
    live.check_room("j", 100, 5)  # room again once given back
