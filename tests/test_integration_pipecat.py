"""The Pipecat adapter (`avatard.integrations.pipecat_video`) against a real daemon (fake
engines) in Pipecat's own pipelines: `run_test` from `pipecat.tests.utils`, and for the
barge-in its parts (`Pipeline`, `PipelineWorker`, `WorkerRunner`, `QueuedFrameProcessor`),
so the interruption can be sent once speech is seen playing rather than after a sleep.

Offline: nothing leaves the machine. No timing assertions: counts, order and contents;
every wait is bounded and names what it waited for."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

if os.environ.get("AVATARD_EXPECT_INSTALLED") != "1":
    # CI installs the extra: a skip there would hide a broken install.
    pytest.importorskip("pipecat", reason="needs the `pipecat` extra")

from daemon_harness import run_daemon
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection
from pipecat.tests.utils import QueuedFrameProcessor, run_test
from pipecat.workers.runner import WorkerRunner
from test_live import RATE, RINGS, SIZE, TICK

from avatard.engines.fake import audio_level, frame_audio_level_of, frame_index_of
from avatard.integrations.pipecat_video import AvatardVideoService
from avatard.ipc.client import ClientError

FAKE = {"width": SIZE, "height": SIZE}
WAIT_S = 30.0  # bound of every wait of a test step; far above what a step needs


def tts_audio(
    pcm: np.ndarray, channels: int = 1, frame_s: float = 0.05, context_id: str | None = None
) -> list[TTSAudioRawFrame]:
    """Float PCM in [-1, 1] as a TTS's audio frames of `frame_s` seconds (int16; for
    `channels` > 1 the same signal on each channel, interleaved)."""
    samples = np.rint(pcm * 32768).clip(-32768, 32767).astype(np.int16)
    step = int(RATE * frame_s)
    return [
        TTSAudioRawFrame(
            audio=np.repeat(samples[i : i + step], channels).tobytes(),
            sample_rate=RATE,
            num_channels=channels,
            context_id=context_id,
        )
        for i in range(0, samples.size, step)
    ]


def int16(pcm: np.ndarray) -> np.ndarray:
    return np.rint(pcm * 32768).astype(np.int16)


def level_of(frame: TTSAudioRawFrame) -> int:
    return audio_level(np.frombuffer(frame.audio, np.int16).astype(np.float32) / 32768)


def checked_lip_sync(frames: list) -> list[TTSAudioRawFrame]:
    """Check every image and audio frame the service pushed: images RGB at the session's
    size with continuous indices; each audio frame int16 mono, one frame period long,
    right after the image made from it (a fake live frame shows its audio's level); images
    that carry speech synchronised with the audio, idle ones not. Returns the audio."""
    images = [f for f in frames if isinstance(f, OutputImageRawFrame)]
    assert images and {(f.size, f.format) for f in images} == {((SIZE, SIZE), "RGB")}
    arrays = [np.frombuffer(f.image, np.uint8).reshape(SIZE, SIZE, 3) for f in images]
    indices = [frame_index_of(a) for a in arrays]
    assert indices == list(range(indices[0], indices[0] + len(indices))), "images skipped"
    levels = {id(f): frame_audio_level_of(a) for f, a in zip(images, arrays, strict=True)}
    audio = []
    for i, frame in enumerate(frames):
        if isinstance(frame, TTSAudioRawFrame):
            image = frames[i - 1]
            assert isinstance(image, OutputImageRawFrame), f"audio after {image}"
            assert (frame.sample_rate, frame.num_channels, frame.num_frames) == (RATE, 1, TICK)
            assert levels[id(image)] == level_of(frame)
            assert image.sync_with_audio
            audio.append(frame)
        elif isinstance(frame, OutputImageRawFrame) and not (
            i + 1 < len(frames) and isinstance(frames[i + 1], TTSAudioRawFrame)
        ):
            assert not frame.sync_with_audio, "an idle image waits for audio"
    return audio


def test_tts_responses_come_out_lip_synced_between_their_started_and_stopped(tmp_path):
    first = np.full(RATE // 2, 0.5, np.float32)  # 0.5 s: 12.5 frame periods
    second = (np.sin(np.arange(int(RATE * 0.3)) / 7.0) * 0.25).astype(np.float32)
    started = [TTSStartedFrame(context_id="r1"), TTSStartedFrame(context_id="r2")]
    stopped = [TTSStoppedFrame(context_id="r1"), TTSStoppedFrame(context_id="r2")]
    sent = [
        started[0],
        *tts_audio(first, context_id="r1"),
        stopped[0],
        # Stereo: the service averages channels (the same signal on both here).
        started[1],
        *tts_audio(second, channels=2, context_id="r2"),
        stopped[1],
    ]

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        service = AvatardVideoService(endpoint=d.endpoint, seed=2, timeout_s=20)
        # run_test sends an EndFrame after them: the service lets the speech play out.
        down, up = asyncio.run(
            asyncio.wait_for(run_test(service, frames_to_send=sent, start_timeout=WAIT_S), 60)
        )
        d.wait_for(lambda s: s["queue"]["running"] == 0, 20, "the session closed")

    assert service.session is None and up == []
    audio = checked_lip_sync(down)
    played = np.concatenate([np.frombuffer(f.audio, np.int16) for f in audio])
    # Exactly the speech sent, the second response right after the first, then silence
    # to the end of its frame period; none of the TTS's own audio frames passed on.
    speech = int16(np.concatenate([first, second]))
    assert len(audio) == -(-speech.size // TICK)
    np.testing.assert_array_equal(played[: speech.size], speech)
    assert not played[speech.size :].any()
    # The TTS's own started/stopped frames come when the avatar starts and stops saying
    # each response: started before its first audio, stopped after its last.
    at = {id(f): i for i, f in enumerate(down)}
    audio_at = [at[id(f)] for f in audio]
    assert [f for f in down if isinstance(f, TTSStartedFrame | TTSStoppedFrame)] == [
        started[0],
        started[1],
        stopped[0],
        stopped[1],
    ]
    first_frames = -(-first.size // TICK)  # the frame period they share counts to r1
    assert at[id(started[0])] < audio_at[0]
    assert audio_at[first_frames - 2] < at[id(started[1])] < audio_at[first_frames - 1]
    assert audio_at[first_frames - 1] < at[id(stopped[0])] < audio_at[first_frames]
    assert audio_at[-1] < at[id(stopped[1])]
    assert [f.context_id for f in audio] == ["r1"] * first_frames + ["r2"] * (
        len(audio) - first_frames
    )


class Sink:
    """What reaches the end of a pipeline, read as it comes (bounded waits)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.frames: list = []

    async def until(self, predicate, what: str) -> None:
        async def read():
            while not predicate(self.frames):
                self.frames.append(await self.queue.get())

        try:
            await asyncio.wait_for(read(), WAIT_S)
        except TimeoutError:
            pytest.fail(f"waited {WAIT_S:g} s for {what}")

    def count(self, cls, after: int = 0) -> int:
        return sum(isinstance(f, cls) for f in self.frames[after:])


def test_interruption_cuts_the_speech_and_the_next_response_plays(tmp_path):
    long = np.full(RATE * 3, 0.25, np.float32)  # 3 s: cut short
    after = np.full(RATE // 5, 0.75, np.float32)  # 0.2 s: 5 frames

    async def scenario(endpoint: str):
        service = AvatardVideoService(endpoint=endpoint, seed=3, timeout_s=20)
        sink = Sink()
        worker = PipelineWorker(
            Pipeline(
                [
                    service,
                    QueuedFrameProcessor(
                        queue=sink.queue, queue_direction=FrameDirection.DOWNSTREAM
                    ),
                ]
            ),
            cancel_on_idle_timeout=False,
        )
        running = asyncio.Event()

        @worker.event_handler("on_pipeline_started")
        async def _started(worker, frame):
            running.set()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        run = asyncio.ensure_future(runner.run())
        try:
            await asyncio.wait_for(running.wait(), WAIT_S)
            for frame in [
                TTSStartedFrame(context_id="long"),
                *tts_audio(long),
                TTSStoppedFrame(context_id="long"),
            ]:
                await worker.queue_frame(frame)
            await sink.until(
                lambda frames: sum(isinstance(f, TTSAudioRawFrame) for f in frames) >= 5,
                "5 frames of speech",
            )
            await worker.queue_frame(InterruptionFrame())
            await sink.until(
                lambda frames: any(isinstance(f, InterruptionFrame) for f in frames),
                "the interruption",
            )
            cut_at = next(i for i, f in enumerate(sink.frames) if isinstance(f, InterruptionFrame))
            await sink.until(lambda frames: len(frames) > cut_at + 20, "frames after it")
            for frame in [
                TTSStartedFrame(context_id="next"),
                *tts_audio(after),
                TTSStoppedFrame(context_id="next"),
            ]:
                await worker.queue_frame(frame)
            await sink.until(
                lambda frames: any(isinstance(f, TTSStoppedFrame) for f in frames),
                "the next response's end",
            )
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(run, WAIT_S)
        finally:
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        while not sink.queue.empty():
            sink.frames.append(sink.queue.get_nowait())
        return service, sink.frames, cut_at

    with run_daemon(tmp_path, fake=FAKE, sections=RINGS) as d:
        service, frames, cut_at = asyncio.run(scenario(d.endpoint))
        d.wait_for(lambda s: s["queue"]["running"] == 0, 20, "the session closed")

    assert service.session is None
    audio = checked_lip_sync(frames)
    levels = [level_of(f) for f in audio]
    cut = levels.count(audio_level(long))
    assert 5 <= cut < long.size // TICK
    assert levels == [audio_level(long)] * cut + [audio_level(after)] * (after.size // TICK)
    # Nothing of the cut response after the interruption; its stop never came out (the
    # interruption said it); the next response is whole, between its started and stopped.
    assert all(f.context_id == "next" for f in frames[cut_at:] if isinstance(f, TTSAudioRawFrame))
    ends = [f for f in frames if isinstance(f, TTSStartedFrame | TTSStoppedFrame)]
    assert [(type(f), f.context_id) for f in ends] == [
        (TTSStartedFrame, "long"),
        (TTSStartedFrame, "next"),
        (TTSStoppedFrame, "next"),
    ]
    assert frames.index(ends[1]) > cut_at
    np.testing.assert_array_equal(
        np.concatenate([np.frombuffer(f.audio, np.int16) for f in audio[cut:]]), int16(after)
    )
    assert isinstance(frames[-1], EndFrame)


def test_no_daemon_is_an_error_upstream(tmp_path):
    service = AvatardVideoService(endpoint=f"ipc://{tmp_path}/no-daemon.sock", timeout_s=1)
    down, up = asyncio.run(
        asyncio.wait_for(
            run_test(service, frames_to_send=[TTSStartedFrame()], start_timeout=WAIT_S), 60
        )
    )
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and isinstance(errors[0].exception, ClientError)
    assert "avatard: could not open a live session" in errors[0].error
    assert f"{tmp_path}/no-daemon.sock" in errors[0].error
    assert service.session is None


def test_the_service_settings_are_complete_so_pipecat_logs_no_error_at_start():
    # AIService.start() checks its settings and logs an error for a NOT_GIVEN field
    # (found by a fresh-eyes review: "ServiceSettings: the following fields are
    # NOT_GIVEN: model" at every start).
    from loguru import logger

    from avatard.integrations.pipecat_video import AvatardVideoService

    messages: list[str] = []
    sink = logger.add(messages.append, level="ERROR")
    try:
        AvatardVideoService()._settings.validate_complete()
    finally:
        logger.remove(sink)
    assert not [m for m in messages if "NOT_GIVEN" in m], messages
