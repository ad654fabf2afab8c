"""The asyncio client (`avatard.ipc.async_client`) against a real daemon with the fake
engines: live sessions (segments, barge-in, streamed text, refused input, several at once
from one event loop), batch jobs, a task cancelled mid-session and a daemon that vanishes.

No timing assertions: counts, order and contents. Each test runs its coroutine with
`asyncio.run`; every wait is bounded by the client's timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from daemon_harness import FAST_RESTART, FAST_TIMEOUTS, free_port, reap_killed_daemon, run_daemon
from test_live import (
    FPS,
    RATE,
    RINGS,
    SIZE,
    TICK,
    Recorder,
    assert_continuous,
    segment_is,
)

from avatard.daemon import PrivateDaemon
from avatard.engines.audio import resample
from avatard.engines.fake import FakeTTSEngine, audio_level, expected_frame
from avatard.ipc import protocol as P
from avatard.ipc.async_client import AsyncClient, AsyncLiveSession
from avatard.ipc.client import (
    DAEMON_GONE,
    ClientError,
    DaemonUnavailable,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    JobFailedError,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    TranscriptResult,
)

FAKE = {"width": SIZE, "height": SIZE}


class AsyncRecorder(Recorder):
    """`test_live.Recorder` reading an `AsyncLiveSession`: the same checks of every frame
    against the audio sent with it."""

    session: AsyncLiveSession

    async def next(self):  # type: ignore[override]
        return self.take(await self.session.__anext__())

    async def frames_more(self, count: int) -> None:  # type: ignore[override]
        target = len(self.frames) + count
        while len(self.frames) < target:
            await self.next()

    async def until(self, predicate):  # type: ignore[override]
        while True:
            event = await self.next()
            if predicate(event):
                return event

    async def close(self) -> DoneEvent:  # type: ignore[override]
        await self.session.close()
        await self.until(lambda e: isinstance(e, DoneEvent))
        assert self.done is not None
        return self.done


async def send_in_chunks(session: AsyncLiveSession, pcm: np.ndarray, rate: int,
                         segment_id: str, chunk_s: float = 0.1) -> None:
    step = int(rate * chunk_s)
    for start in range(0, pcm.size, step):
        await session.send_audio(pcm[start:start + step], rate, segment_id)


def mapped_segments() -> list[str]:
    """Shared-memory segments this process has mapped now."""
    with open(f"/proc/{os.getpid()}/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "/dev/shm/avatard-" in line})


TRANSPORTS = pytest.mark.parametrize("transport", ["shm", "inline", "tcp"])


@TRANSPORTS
def test_two_segments_play_in_order_exactly_as_sent(tmp_path, transport):
    first = np.full(RATE // 2, 0.25, np.float32)  # 0.5 s at 16 kHz
    second = (np.sin(np.arange(int(48000 * 0.3)) / 9.0) * 0.5).astype(np.float32)  # 48 kHz
    tcp = f"tcp://127.0.0.1:{free_port()}"
    daemon = {"tcp_endpoint": tcp} if transport == "tcp" else {}

    async def scenario(endpoint: str, inline: bool | None):
        async with AsyncClient(endpoint, timeout_s=20, inline=inline) as client:
            assert client.inline == (transport != "shm")
            async with client.live(seed=5) as session:
                assert (session.fps, session.width, session.height, session.audio_rate) == (
                    FPS, SIZE, SIZE, RATE)
                rec = AsyncRecorder(session, seed=5)
                await rec.frames_more(5)  # idle: frames come before any speech
                await send_in_chunks(session, first, RATE, "a")
                await session.end_segment("a")
                await rec.until(segment_is(PlaybackFinishedEvent, "a"))
                pause_from = len(rec.frames)
                await rec.frames_more(12)
                await send_in_chunks(session, second, 48000, "b")
                await session.end_segment("b")
                await rec.until(segment_is(PlaybackFinishedEvent, "b"))
                await rec.close()
        return rec, pause_from

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS, daemon=daemon) as d:
        endpoint = tcp if transport == "tcp" else d.endpoint
        rec, pause_from = asyncio.run(scenario(endpoint, True if transport == "inline"
                                               else None))

    assert_continuous(rec)
    assert rec.done.frames == len(rec.frames) and rec.done.frames_dropped == 0
    started_a, started_b = rec.of(PlaybackStartedEvent)
    finished_a, finished_b = rec.of(PlaybackFinishedEvent)
    order = [rec.events.index(e) for e in (started_a, finished_a, started_b, finished_b)]
    assert order == sorted(order)
    assert (finished_a.position_s, finished_a.interrupted) == (0.5, False)
    assert (finished_b.position_s, finished_b.interrupted) == (0.3, False)
    pcm = rec.pcm()
    a_at = rec.position(started_a) * TICK
    np.testing.assert_array_equal(pcm[a_at:a_at + first.size], first)
    assert not pcm[:a_at].any()
    b_at = rec.position(started_b) * TICK
    assert rec.position(started_b) >= pause_from + 12
    assert not pcm[a_at + first.size:b_at].any()
    expected_b = resample(second, 48000, RATE)
    np.testing.assert_array_equal(pcm[b_at:b_at + expected_b.size], expected_b)


def test_interrupt_then_streamed_text_in_one_session(tmp_path):
    speech = np.full(RATE * 2, 0.5, np.float32)  # 2 s: more than is read before the barge-in
    tts = FakeTTSEngine()
    spoken = np.concatenate([tts.synthesize(t)[0] for t in ("Hello there.", "How are you")])

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=20) as client, \
                client.live(seed=6) as session:
            rec = AsyncRecorder(session, seed=6)
            await session.send_audio(speech, RATE, "a")
            await session.end_segment("a")
            await rec.until(segment_is(PlaybackStartedEvent, "a"))
            await rec.frames_more(10)
            await session.interrupt()
            finished = await rec.until(segment_is(PlaybackFinishedEvent, "a"))
            after = len(rec.frames)
            await rec.frames_more(10)  # frames go on, silent
            late = await session.send_audio(speech[:TICK], RATE, "a")  # "a" was cut short
            refused = await rec.until(lambda e: isinstance(e, InputRefusedEvent))
            for fragment in ("Hel", "lo there", ".", " How are", " you"):
                await session.send_text(fragment, "t")
            await session.send_text("", "t", final=True)
            started_t = await rec.until(segment_is(PlaybackStartedEvent, "t"))
            finished_t = await rec.until(segment_is(PlaybackFinishedEvent, "t"))
            await rec.close()
        return rec, finished, after, late, refused, started_t, finished_t

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        rec, finished, after, late, refused, started_t, finished_t = asyncio.run(
            scenario(d.endpoint))

    assert_continuous(rec, silenced_from=after)
    assert finished.interrupted and 0 < finished.position_s < 2.0
    assert round(finished.position_s * RATE) == sum(
        rec.audio[i].astype(bool).sum() for i in rec.audio if i < after)
    assert not any(rec.audio[i].any() for i in range(after, after + 10))
    assert (refused.req_id, refused.code, refused.field, refused.what) == (
        late, P.E_BAD_INPUT, "segment_id", "LiveAudio")
    assert (finished_t.position_s, finished_t.interrupted) == (spoken.size / RATE, False)
    played = np.concatenate([rec.audio[i] for i in range(rec.position(started_t),
                                                         rec.position(finished_t))])
    np.testing.assert_array_equal(played[played != 0], spoken[spoken != 0])
    assert rec.done.frames == len(rec.frames)


def test_refused_input_is_an_event_and_the_session_runs_on(tmp_path):
    tone = np.full(TICK * 5, 0.25, np.float32)

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=20) as client:
            with pytest.raises(ClientError) as unknown:
                await client.live(avatar="no-such-avatar")
            async with client.live(seed=8) as session:
                rec = AsyncRecorder(session, seed=8)
                s = session
                sent = {
                    await s.send_audio(tone.astype(np.float64), RATE, "x"): (
                        P.E_BAD_MESSAGE, "audio.dtype"),
                    await s.send_audio(tone.reshape(-1, 2), RATE, "x"): (
                        P.E_BAD_MESSAGE, "audio.shape"),
                    await s.send_audio(np.zeros(0, np.float32), RATE, "x"): (
                        P.E_BAD_INPUT, "audio"),
                }
                await s.send_audio(tone, RATE, "a")
                sent[await s.send_audio(tone, 22050, "a")] = (P.E_BAD_INPUT, "sample_rate")
                sent[await s.send_text("Hi. ", "a")] = (P.E_BAD_INPUT, "segment_id")
                await s.end_segment("a")
                refused = {}
                while len(refused) < len(sent):
                    event = await rec.next()
                    if isinstance(event, InputRefusedEvent):
                        refused[event.req_id] = (event.code, event.field)
                finished = await rec.until(segment_is(PlaybackFinishedEvent, "a"))
                await rec.frames_more(3)
                await rec.close()
        return unknown.value, sent, refused, finished, rec

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        unknown, sent, refused, finished, rec = asyncio.run(scenario(d.endpoint))

    assert (unknown.code, unknown.field) == (P.E_NOT_FOUND, "avatar_id")
    assert refused == sent
    assert (finished.position_s, finished.interrupted) == (tone.size / RATE, False)
    assert_continuous(rec)
    assert rec.done.frames == len(rec.frames) and rec.done.frames_dropped == 0


def test_four_sessions_and_a_job_at_once_from_one_loop(tmp_path):
    """One client, one event loop, five tasks: each session sees only its own frames (the
    fake frames carry the seed) and plays only its own speech."""
    levels = [0.1, 0.2, 0.3, 0.4]

    async def talk(client: AsyncClient, seed: int, level: float):
        async with client.live(seed=seed) as session:
            rec = AsyncRecorder(session, seed=seed)
            await rec.frames_more(3)
            await send_in_chunks(session, np.full(RATE // 5, level, np.float32), RATE, "s")
            await session.end_segment("s")
            await rec.until(segment_is(PlaybackFinishedEvent, "s"))
            await rec.frames_more(2)
            await rec.close()
            return rec

    async def speak(client: AsyncClient):
        job = await client.speak("One two three. Four five.", seed=9)
        frames, last = [], None
        async for last in job:
            if isinstance(last, FrameEvent):
                frames.append((last.index, np.array(last.array)))  # the slot goes back
        return frames, last, job

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=30) as client:
            return await asyncio.gather(
                *(talk(client, seed, level) for seed, level in enumerate(levels, 1)),
                speak(client))

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS, daemon={"jobs_per_worker": 5}) as d:
        *recs, (frames, done, job) = asyncio.run(scenario(d.endpoint))

    for rec, level in zip(recs, levels, strict=True):
        assert_continuous(rec)
        assert rec.done.frames == len(rec.frames)
        finished = rec.of(PlaybackFinishedEvent)[0]
        assert (finished.position_s, finished.interrupted) == (0.2, False)
        speech = np.full(TICK, level, np.float32)
        assert {audio_level(rec.audio[i]) for i in rec.frames} == {0, audio_level(speech)}
        assert rec.pcm().astype(bool).sum() == RATE // 5
    assert isinstance(done, DoneEvent) and done.frames == len(frames) > 0
    for index, (sent_index, frame) in enumerate(frames):
        assert sent_index == index
        np.testing.assert_array_equal(frame, expected_frame(9, index, SIZE, SIZE))
    assert frames[0][1].shape == job.frame_shape  # announced in `accepted`


def test_batch_jobs_streamed_audio_and_transcripts(tmp_path):
    """lipsync with audio larger than one payload (streamed in chunks), and transcribe;
    every frame is the fake engine's, exactly."""
    small = 64 * 1024
    pcm = (np.sin(np.arange(int(RATE * 2.4)) / 7.0) * 0.3).astype(np.float32)  # 154 KB

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=20) as client:
            assert client.max_payload_bytes == small
            job = await client.lipsync(pcm, RATE, seed=4)
            frames = []
            async for event in job:
                if isinstance(event, FrameEvent):
                    frames.append(np.array(event.array))
                last = event
            transcript = await client.transcribe(pcm, RATE)
        return frames, last, transcript

    with run_daemon(tmp_path, fake=FAKE, sections={
            "rings": {"input_slot_bytes": small, "inline_slot_bytes": small}}) as d:
        frames, done, transcript = asyncio.run(scenario(d.endpoint))

    assert isinstance(done, DoneEvent) and done.frames == len(frames) == 60
    for index, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, expected_frame(4, index, SIZE, SIZE))
    assert isinstance(transcript, TranscriptResult)
    assert transcript.duration_s == pytest.approx(2.4, abs=0.01)


def test_a_slow_engine_is_not_taken_for_a_slow_client(tmp_path):
    """The slot of an event goes back when the next one is asked for, before the wait:
    frames that take longer than client_call_s to make do not end the job."""
    pcm = np.zeros(TICK * 3, np.float32)  # 3 frames, 1.5 s each

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=20) as client:
            # Indices and types only: a frame's array is a view of a slot given back.
            return [(type(e), getattr(e, "index", None))
                    async for e in await client.lipsync(pcm, RATE, seed=2)]

    with run_daemon(tmp_path, fake={**FAKE, "frame_ms": 1500},
                    timeouts={"client_call_s": 1.0, "stall_timeout_s": 20}) as d:
        events = asyncio.run(scenario(d.endpoint))

    assert [index for kind, index in events if kind is FrameEvent] == [0, 1, 2]
    assert events[-1][0] is DoneEvent


def test_a_task_cancelled_mid_session_closes_it_and_leaves_nothing(tmp_path):
    speech = np.full(RATE * 5, 0.25, np.float32)

    async def scenario(endpoint: str):
        client = AsyncClient(endpoint, timeout_s=20)
        reading = asyncio.Event()

        async def talk():
            async with client, client.live(seed=2) as session:
                await session.send_audio(speech[:RATE], RATE, "a")
                frames = 0
                async for event in session:
                    frames += isinstance(event, FrameEvent)
                    if frames == 5:
                        reading.set()

        task = asyncio.create_task(talk())
        async with asyncio.timeout(20):
            await reading.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return client

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        baseline = len(d.segments())
        client = asyncio.run(scenario(d.endpoint))
        assert client._sock is not None and client._sock.closed
        assert not mapped_segments(), "the client still maps the daemon's rings"
        # The session ended (its close, then the client's bye) and its rings went.
        d.wait_for(lambda s: s["queue"]["running"] == 0 and s["daemon"]["sessions"] == 1,
                   20, "the cancelled client's session to end")
        deadline = time.monotonic() + 20
        while len(d.segments()) > baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(d.segments()) == baseline, "the session's rings were not unlinked"


def test_a_session_whose_caller_gave_up_before_accepted_is_cancelled(tmp_path):
    """The task opening a session is cancelled while it waits for `accepted`: the
    session the daemon then opens would run for nobody, so the client cancels it."""

    async def scenario(endpoint: str):
        async with AsyncClient(endpoint, timeout_s=20) as client:
            async def open_one():
                return await client.live(seed=1)

            opening = asyncio.create_task(open_one())
            await asyncio.sleep(0)  # it sent live_open and waits for the reply
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            async with asyncio.timeout(20):
                while True:  # the client stays connected: no bye ends the session
                    stats = await client.stats()
                    if stats["jobs"]["jobs_cancelled"] and not stats["queue"]["running"]:
                        break
                    await asyncio.sleep(0.05)
            async with client.live(seed=2) as session:  # the client serves on
                rec = AsyncRecorder(session, seed=2)
                await rec.frames_more(3)
                await rec.close()
            return stats, rec

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        stats, rec = asyncio.run(scenario(d.endpoint))

    assert stats["jobs"]["jobs_cancelled"] == 1
    assert_continuous(rec)


def test_a_vanished_daemon_ends_every_wait_with_a_clear_error(tmp_path):
    d = PrivateDaemon(tmp_path, {
        "daemon": {"workers": 1, "min_ready": 1, "devices": "cpu"},
        "timeouts": FAST_TIMEOUTS, "restart": FAST_RESTART,
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": FAKE, **RINGS,
    })

    async def scenario():
        # A timeout far beyond the test's own: only the dropped connection ends the waits.
        async with AsyncClient(d.endpoint, timeout_s=600) as client:
            session = await client.live(seed=3)
            frames = 0
            with pytest.raises(DaemonUnavailable) as during_events:
                async for event in session:
                    frames += isinstance(event, FrameEvent)
                    if frames == 5:
                        os.kill(d.proc.pid, signal.SIGKILL)
            with pytest.raises(DaemonUnavailable) as later_call:
                await client.health()
            with pytest.raises(DaemonUnavailable) as later_send:
                await session.send_text("Hello.", "t")
        return during_events.value, later_call.value, later_send.value

    pids = [d.proc.pid]
    try:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 60, "a ready worker")
        pids += d.worker_pids()
        errors = asyncio.run(scenario())
        for error in errors:
            assert error.code == DAEMON_GONE, error
            assert "closed the connection" in str(error) and "exited or restarted" in str(error)
        assert "event of live session" in str(errors[0])
        assert "Health" in str(errors[1]) and "LiveText" in str(errors[2])
        assert d.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        reap_killed_daemon(d, pids)
    assert not mapped_segments()


def test_connecting_to_no_daemon_times_out_naming_the_wait(tmp_path):
    async def scenario():
        client = AsyncClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.5)
        with pytest.raises(DaemonUnavailable) as err:
            await client.connect()
        return client, err.value

    client, error = asyncio.run(scenario())
    assert error.code == P.E_TIMEOUT and "no Hello from a daemon" in str(error)
    assert "nobody.sock does not exist" in str(error)  # why: no daemon listens there
    assert client._sock is not None and client._sock.closed



@pytest.mark.timeout(120)
def test_a_stopped_daemon_is_reported_with_the_clients_own_heartbeat_timeout(tmp_path):
    """The AsyncClient's heartbeat timeout is its own setting, and the error names the
    value in force (it was always 5 s, and the message did not say heartbeats)."""
    with run_daemon(tmp_path, workers=1, fake=FAKE) as d:

        async def scenario():
            # A timeout far beyond the test's bound: only the heartbeats can end the wait.
            async with AsyncClient(d.endpoint, timeout_s=600, heartbeat_timeout_s=2.0) as client:
                session = await client.live(seed=3)
                frames = 0
                try:
                    with pytest.raises(DaemonUnavailable) as caught:
                        async for event in session:
                            frames += isinstance(event, FrameEvent)
                            if frames == 3:
                                os.kill(d.proc.pid, signal.SIGSTOP)
                finally:
                    os.kill(d.proc.pid, signal.SIGCONT)
                return caught.value

        error = asyncio.run(scenario())
        assert error.code == DAEMON_GONE
        assert "not even a heartbeat, for 2 s (stopped or hung)" in str(error), error
        d.wait_for(lambda s: s["queue"]["running"] == 0, 30, "the dropped session ended")


def test_a_task_that_reads_again_after_its_slots_were_taken_back_sees_the_timeout(tmp_path):
    # As for the blocking client: past timeouts.client_call_s without reading, the daemon
    # takes the slots back and ends the session; reading on raises that failure.
    async def scenario(endpoint: str, d) -> JobFailedError:
        async with AsyncClient(endpoint, timeout_s=20) as client, \
                client.live(seed=5) as session:
            rec = AsyncRecorder(session, seed=5)
            await rec.frames_more(3)
            await asyncio.to_thread(
                d.wait_for, lambda s: s["queue"]["running"] == 0, 30,
                "the daemon to end the session of a client that stopped reading")
            with pytest.raises(JobFailedError) as failure:
                await rec.until(lambda e: False)
            return failure.value

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS,
                    timeouts={"client_call_s": 1.0}) as d:
        failure = asyncio.run(scenario(d.endpoint, d))
    assert failure.code == P.E_TIMEOUT and "client_call_s" in str(failure)


def test_leaving_a_session_ends_another_tasks_iteration_over_it(tmp_path):
    # One task reads the session, another leaves its `async with`: the reader's `async for`
    # ends; it once waited timeout_s for events nobody routed to it and raised
    # DaemonUnavailable although the daemon was fine.
    async def scenario(endpoint: str) -> tuple[int, int]:
        async with AsyncClient(endpoint, timeout_s=20) as client:
            reading = asyncio.Event()
            frames = 0

            async def read(session: AsyncLiveSession) -> int:
                nonlocal frames
                async for event in session:
                    frames += isinstance(event, FrameEvent)
                    if frames == 3:
                        reading.set()
                return frames

            async with client.live(seed=2) as session:
                reader = asyncio.create_task(read(session))
                async with asyncio.timeout(20):
                    await reading.wait()
            async with asyncio.timeout(60):  # a bound for the test, not a timing check
                read_frames = await reader
            # The client goes on: a second session on it runs.
            async with client.live(seed=3) as second:
                second_frames = 0
                async for event in second:
                    second_frames += isinstance(event, FrameEvent)
                    if second_frames == 3:
                        break
            return read_frames, second_frames

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        read_frames, second_frames = asyncio.run(scenario(d.endpoint))
    assert read_frames >= 3 and second_frames == 3


def test_a_batch_job_that_completed_while_its_slots_were_taken_back_fails(tmp_path):
    # As for the blocking client: the job completed while this client read nothing for
    # longer than client_call_s; the frames whose slots went back are lost, so reading on
    # raises the timeout instead of ending in a `done` that would hide the loss.
    pcm = np.zeros(TICK * 5, np.float32)  # 5 frames: all fit in the frame ring at once

    async def scenario(endpoint: str, d) -> JobFailedError:
        async with AsyncClient(endpoint, timeout_s=20) as client:
            job = await client.lipsync(pcm, RATE, seed=2)
            await asyncio.to_thread(d.wait_for, lambda s: s["queue"]["running"] == 0, 20,
                                    "the job to complete")
            await asyncio.sleep(2.5)  # past client_call_s and the daemon's check of it
            with pytest.raises(JobFailedError) as failure:
                async for _ in job:
                    pass
            return failure.value

    with run_daemon(tmp_path, fake=FAKE, timeouts={"client_call_s": 1.0},
                    sections={"rings": {"frame_slots": 16, "audio_slots": 16}}) as d:
        failure = asyncio.run(scenario(d.endpoint, d))
    assert failure.code == P.E_TIMEOUT and "completed" in str(failure)
