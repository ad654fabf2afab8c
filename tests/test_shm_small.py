"""A small /dev/shm never kills the daemon (issue 16, item 3).

Segments reserve their pages when they are made, so a full tmpfs is an error at creation
(`ShmFullError`, naming the directory's size, its free space, what was needed and the keys
that size rings), answered `no_space`, never a SIGBUS. The unit tests need no root: a
segment larger than the whole shared-memory file system fails the same way. The daemon
tests run a real daemon and clients in a private mount namespace whose /dev/shm is a small
tmpfs (Docker's default 64 MiB); they need root and `unshare`, and skip otherwise.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatard.daemon.config import RingsConfig
from avatard.daemon.sessions import Sessions
from avatard.ipc import segments
from avatard.ipc.ring import SlotRing, ring_bytes

SCENARIO = Path(__file__).with_name("shm_small_scenario.py")
MIB = 1 << 20


def _too_big() -> int:
    size, _ = segments.shm_space()
    return size + 64 * MIB  # more than the file system holds at all: no page is taken


def test_segment_larger_than_shm_is_refused_at_creation_with_the_figures():
    with pytest.raises(segments.ShmFullError) as caught:
        segments.Segment.create("big", _too_big())
    exc = caught.value
    assert exc.errno == errno.ENOSPC and exc.needed_bytes == _too_big()
    text = str(exc)
    assert str(segments.SHM_DIR) in text and "MiB" in text and "--shm-size" in text
    assert "rings.frame_slots" in text and "rings.inline_slot_bytes" in text
    assert not [n for n in segments.segments_of(os.getpid()) if n.endswith("-big")]


def test_ring_too_big_for_shm_is_refused_and_leaves_nothing():
    slots = _too_big() // MIB + 1
    with pytest.raises(segments.ShmFullError, match="ring|segment"):
        SlotRing.create("huge", slots, MIB)
    # The conftest fixture checks no segment was left.


def test_created_segment_has_every_page_reserved():
    with segments.Segment.create("reserved", 8 * MIB) as seg:
        blocks = os.stat(segments.SHM_DIR / seg.name).st_blocks
        assert blocks * 512 >= 8 * MIB  # not a sparse file: nothing left to fault in


class _NoPort:
    def send(self, *args, **kwargs):
        raise AssertionError("nothing is sent in these tests")

    def send_parts(self, *args, **kwargs):
        raise AssertionError("nothing is sent in these tests")


def test_sessions_refuse_rings_that_do_not_fit_and_open_nothing():
    small = dict(frame_slots=2, frame_slot_bytes=1024, audio_slots=2, audio_slot_bytes=1024,
                 inline_slots=1, inline_slot_bytes=1024)
    sessions = Sessions(RingsConfig(input_slots=1, input_slot_bytes=_too_big() // 4 * 4,
                                    **small), _NoPort(), 30.0, 300.0)
    try:
        with pytest.raises(segments.ShmFullError):
            sessions.hello(b"local", inline=False, now=0.0)
        assert len(sessions) == 0
        assert sessions.hello(b"remote", inline=True, now=0.0).input_ring is None
    finally:
        sessions.close_all()
    huge_frames = RingsConfig(frame_slots=2, frame_slot_bytes=_too_big() // 2,
                              input_slots=1, input_slot_bytes=1024,
                              **{k: v for k, v in small.items() if not k.startswith("frame")})
    sessions = Sessions(RingsConfig(**{**small, "input_slots": 1, "input_slot_bytes": 1024}),
                        _NoPort(), 30.0, 300.0)
    try:
        sessions.rings_cfg = huge_frames
        sessions.hello(b"local", inline=False, now=0.0)
        before = set(sessions.output_rings)
        with pytest.raises(segments.ShmFullError):
            sessions.output_names(b"local", 0, 0, busy=set())
        assert set(sessions.output_rings) == before and not sessions.get(b"local").outputs
    finally:
        sessions.close_all()


def test_a_session_drops_ring_pairs_no_job_holds_before_making_a_new_one():
    rings = RingsConfig(frame_slots=2, frame_slot_bytes=1024, audio_slots=2,
                        audio_slot_bytes=1024, input_slots=1, input_slot_bytes=1024,
                        inline_slots=1, inline_slot_bytes=1024)
    sessions = Sessions(rings, _NoPort(), 30.0, 300.0)
    try:
        sessions.hello(b"c", inline=False, now=0.0)
        first = sessions.output_names(b"c", 0, 0, busy=set())
        second = sessions.output_names(b"c", 1, 0, busy={(0, 0)})  # a job still on w0
        assert set(sessions.get(b"c").outputs) == {(0, 0), (1, 0)}
        third = sessions.output_names(b"c", 2, 1, busy={(1, 0)})  # w0's job ended
        assert set(sessions.get(b"c").outputs) == {(1, 0), (2, 1)}
        assert first[0] not in sessions.output_rings and second[0] in sessions.output_rings
        assert not (segments.SHM_DIR / first[0]).exists()
        assert sessions.shm_bytes()["session_rings_bytes"] == (
            ring_bytes(1, 1024) + 2 * (ring_bytes(2, 1024) * 2))
        assert third == sessions.output_names(b"c", 2, 1, busy=set())  # kept while in use
    finally:
        sessions.close_all()


# ---------------------------------------------------------------- a real 64 MiB /dev/shm


def _namespaces_allowed() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=1m avatard-probe /dev/shm"],
        capture_output=True, timeout=30)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not _namespaces_allowed(),
                                     reason="needs root and unshare --mount (a private "
                                     "/dev/shm)")


def _in_small_shm(size: str, mode: str, workdir: Path) -> dict:
    script = 'mount -t tmpfs -o size="$0" avatard-test /dev/shm && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, size,
         sys.executable, str(SCENARIO), mode, str(workdir)],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"scenario failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_namespace
@pytest.mark.timeout(420)
def test_defaults_serve_several_sessions_in_64_mib_and_refuse_more_with_no_space(tmp_path):
    found = _in_small_shm("64m", "serve", tmp_path)
    log = found["log_tail"]
    assert found["shm_size"] == 64 * MIB
    # Three local sessions rendered 512x512 frames at once, each to its end.
    assert all(r.get("last") == "DoneEvent" and r["frames"] > 0
               for r in found["concurrent"].values()), (found["concurrent"], log)
    # Six 7 MiB portraits: all accepted, the store keeps what avatars.max_bytes allows.
    assert len(set(found["photos"])) == 6
    assert found["avatars"]["bytes"] <= 16 * MIB and found["avatars"]["evictions"] >= 4
    # Past what fits, a hello is refused with a clear no_space, not a signal.
    refused = found["hello_refused"]
    assert refused["code"] == "no_space" and refused["after"] >= 1, refused
    assert "/dev/shm has no room" in refused["message"] and "MiB" in refused["message"]
    # A job whose session rings cannot be made fails no_space; then the same session works.
    assert found["squeezed_job"]["code"] == "no_space", found["squeezed_job"]
    assert found["after_room"] == "DoneEvent"
    assert found["status_after"] == "ready"
    assert found["exit_code"] == 0, log
    assert found["left"] == [], found["left"]


@needs_namespace
@pytest.mark.timeout(420)
def test_idle_portraits_make_room_for_a_sessions_rings(tmp_path):
    """40 MiB: the daemon's rings take 23 MiB, two 7 MiB portraits most of the rest. A
    local session (4 MiB input ring) and its job (7 MiB ring pair) fit only once both
    portraits are let go; before, the session was refused `no_space`."""
    found = _in_small_shm("40m", "crowd", tmp_path)
    log = found["log_tail"]
    assert found["free_after_photos"] < found["per_session_bytes"], found
    assert found["local_job"] == "DoneEvent", (found["local_job"], log)
    assert found["avatars"]["evictions"] == 2 and found["avatars"]["count"] == 0
    assert "to make room for a client session's input ring" in log, log
    assert "to make room for the rings of job" in log, log
    evicted = found["evicted_use"]
    assert evicted["code"] == "not_found" and "register it again" in evicted["message"]
    assert found["exit_code"] == 0, log
    assert found["left"] == [], found["left"]


@needs_namespace
@pytest.mark.timeout(300)
def test_daemon_refuses_to_start_when_its_own_rings_do_not_fit(tmp_path):
    found = _in_small_shm("16m", "refuse", tmp_path)
    assert found["exit_code"] not in (0, -7, 135), found  # a clear exit, not SIGBUS
    assert "/dev/shm has no room" in found["log_tail"], found["log_tail"]
    assert "Traceback" not in found["log_tail"], found["log_tail"]
    assert found["left"] == [], found["left"]


# ---------------------------------------------------------------- small audio slots


@pytest.mark.timeout(120)
def test_a_sentence_longer_than_an_audio_slot_arrives_as_several_chunks(tmp_path):
    from daemon_harness import run_daemon

    from avatard.engines.registry import load_engine

    text = "One two three four five six seven eight. Nine ten."
    expected = [np.asarray(s, np.float32) for s in load_engine("tts", "fake").stream(text)]
    slot_bytes = 4096  # 1024 samples per chunk; each fake sentence is several thousand
    with run_daemon(tmp_path, sections={"rings": {"audio_slot_bytes": slot_bytes}}) as d:
        with d.client(name="audio") as client:
            audio, done = [], None
            for event in client.speak(text, seed=1):  # a slot is valid until the next event
                if type(event).__name__ == "AudioEvent":
                    audio.append(dataclasses.replace(event, pcm=event.pcm.copy()))
                done = event
    assert [e.index for e in audio] == list(range(len(audio)))
    assert len(audio) > len(expected) and all(e.pcm.size <= 1024 for e in audio)
    joined = np.concatenate([e.pcm for e in audio])
    np.testing.assert_array_equal(joined, np.concatenate(expected))
    assert done.audio_samples == joined.size
    starts = np.cumsum([0] + [e.pcm.size for e in audio[:-1]])
    assert [e.pts_us for e in audio] == [int(s) * 1_000_000 // audio[0].sample_rate
                                         for s in starts]


@pytest.mark.timeout(120)
def test_a_frame_larger_than_a_slot_fails_too_large_naming_the_key(tmp_path):
    from daemon_harness import run_daemon

    from avatard.ipc.client import JobFailedError

    # 640 x 480 frames (Ditto renders at a portrait's own size) in the default 512 x 512
    # slots: a config limit, refused once with the key to raise, not retried as a fault.
    with run_daemon(tmp_path, fake={"width": 640, "height": 480}) as d:
        with d.client(name="big") as client:
            with pytest.raises(JobFailedError) as caught:
                list(client.speak("Hello.", seed=1))
    assert caught.value.code == "too_large"
    assert "rings.frame_slot_bytes" in str(caught.value) and "921600" in str(caught.value)
    assert "after 1 attempt" in str(caught.value)
