"""Client side of `avatard render`, `lipsync` and `transcribe`: find a daemon (or start a
private one for the call), run one job, and mux its frames and audio into an mp4.

A private daemon (`PrivateDaemon`) runs in its own runtime directory under a temporary
folder, is stopped with SIGTERM when the call ends (drain, exit 0, nothing left in
/dev/shm), and is killed if it does not stop in time.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from avatard.ipc.client import (
    AudioEvent,
    Client,
    ClientError,
    DaemonUnavailable,
    DoneEvent,
    FrameEvent,
    JobHandle,
    WarningEvent,
    default_endpoint,
)
from avatard.ipc.sockets import ipc_path

from .config import engine_flag_overrides
from .private_daemon import PrivateDaemon, PrivateDaemonError

DEFAULT_FPS = 25  # of every engine we ship; used only when a job announced no fps
PRIVATE_START_TIMEOUT_S = 300.0  # model loads on a slow CPU; the daemon enforces its own
PRIVATE_STOP_TIMEOUT_S = 60.0


@dataclass
class RenderResult:
    path: Path
    frames: int  # frames the mp4 holds (the job's, plus repeats that cover the audio)
    media_s: float  # video length of the mp4
    wall_s: float
    first_frame_s: float
    attempts: int

    @property
    def rtf(self) -> float:
        return self.wall_s / self.media_s if self.media_s else float("nan")


def _daemon_answers(endpoint: str) -> bool:
    path = ipc_path(endpoint)
    if path is not None and not path.exists():
        return False  # no socket file: nobody to ask, no need to wait for a timeout
    try:
        with Client(endpoint, timeout_s=2.0, name="probe", inline=True) as client:
            client.health()
        return True
    except DaemonUnavailable:
        return False


@contextmanager
def daemon_endpoint(endpoint: str | None, overrides: list[str], log: TextIO) -> Iterator[str]:
    """The endpoint of a daemon that answers: `endpoint` (default: `default_endpoint()`),
    or, when none answers there, a private daemon's, started for the block with
    `overrides` (``KEY=VALUE`` config items) and stopped when it ends. `log` gets one line
    when a private daemon starts.

    Raises `ClientError` when the private daemon exits or cannot load its engines,
    `DaemonUnavailable` when it is not ready within PRIVATE_START_TIMEOUT_S, ValueError for
    overrides a private daemon cannot take (daemon.runtime_dir, daemon.endpoint).
    """
    endpoint = endpoint or default_endpoint()
    if _daemon_answers(endpoint):
        yield endpoint
        return
    with tempfile.TemporaryDirectory(prefix="avatard-") as tmp:
        log.write(f"no daemon at {endpoint}: starting a private one\n")
        daemon = PrivateDaemon(Path(tmp), overrides=overrides)
        try:
            try:
                daemon.wait_ready(PRIVATE_START_TIMEOUT_S)
            except PrivateDaemonError as exc:
                raise ClientError(str(exc)) from None
            except TimeoutError as exc:
                raise DaemonUnavailable(str(exc)) from None
            yield daemon.endpoint
        finally:
            try:
                daemon.stop(timeout_s=PRIVATE_STOP_TIMEOUT_S)
            except TimeoutError:
                log.write(f"the private daemon did not stop within {PRIVATE_STOP_TIMEOUT_S:.0f}"
                          " s of SIGTERM: killed\n")


@contextmanager
def connect(endpoint: str | None, overrides: list[str], log: TextIO,
            timeout_s: float = 600.0) -> Iterator[Client]:
    """A client of the daemon `daemon_endpoint` finds (or starts: same arguments, same
    errors). `timeout_s` bounds each call of the client."""
    with daemon_endpoint(endpoint, overrides, log) as found, \
            Client(found, timeout_s=timeout_s, name="cli") as client:
        yield client


class Progress:
    """One status line on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO, label: str):
        self.stream = stream
        self.label = label
        self.enabled = stream.isatty()
        self.started = time.monotonic()

    def update(self, frames: int, media_s: float) -> None:
        if self.enabled and frames % 5 == 0:
            elapsed = time.monotonic() - self.started
            self.stream.write(f"\r{self.label}: {frames} frames, {media_s:.1f} s of video, "
                              f"{elapsed:.1f} s elapsed")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")

    def warn(self, line: str) -> None:
        """A line on the stream, whether or not it is a terminal (a status line being
        drawn is ended first)."""
        self.stream.write(("\n" if self.enabled else "") + line + "\n")
        self.stream.flush()


class JobMp4:
    """One job's mp4, written as its events arrive: `feed` each event in order, then
    `finish` (or `abort`). Each frame is encoded when it is fed and not kept, so memory
    does not grow with the job's length (the encoder's own lookahead aside); only audio
    that comes before the first frame waits, because the writer opens on the first frame
    (its size fixes the video's).

    `out`: the mp4's path (written beside it and renamed on `finish`, `Mp4Writer`);
    `fps`: frames per second of the video track; `audio`: (mono float32 PCM, rate in Hz)
    given by the caller (lipsync), written before any audio event; `progress`: shown per
    frame, and gets the job's warnings. Not thread-safe: one thread at a time.
    """

    def __init__(self, out: Path, fps: int, progress: Progress | None = None,
                 audio: tuple[np.ndarray, int] | None = None):
        from avatard.engines.mux import Mp4Writer

        self._writer_class = Mp4Writer
        self.out, self.fps, self.progress = out, fps, progress
        self.writer: Mp4Writer | None = None
        self.pending_audio: list[tuple[np.ndarray, int]] = [audio] if audio is not None else []
        self.frames = 0  # frames fed (the job's; the file may repeat the last, see finish)
        self.done: DoneEvent | None = None

    def feed(self, event: Any) -> None:
        """One event of the job: a `FrameEvent` ((height, width, 3) uint8 RGB, encoded
        now), an `AudioEvent` (mono float32 PCM at its sample_rate), a `WarningEvent`
        (to `progress`) or the `DoneEvent`; others are ignored. Raises ValueError for a
        frame of another size than the first, and what `Mp4Writer` raises."""
        if isinstance(event, AudioEvent):
            if self.writer is None:
                self.pending_audio.append((np.array(event.pcm), event.sample_rate))
            else:
                self.writer.write_audio(event.pcm)
        elif isinstance(event, FrameEvent):
            if self.writer is None:
                height, width = event.array.shape[:2]
                rate = self.pending_audio[0][1] if self.pending_audio else 16000
                self.writer = self._writer_class(self.out, fps=self.fps, width=width,
                                                 height=height, audio_rate=rate)
                for pcm, _ in self.pending_audio:
                    self.writer.write_audio(pcm)
                self.pending_audio.clear()
            self.writer.write_frame(event.array)
            self.frames += 1
            if self.progress is not None:
                self.progress.update(self.frames, self.frames / self.fps)
        elif isinstance(event, WarningEvent):
            if self.progress is not None:
                self.progress.warn(f"warning: {event.field}: {event.message}")
        elif isinstance(event, DoneEvent):
            self.done = event

    def finish(self) -> RenderResult:
        """Finish the file and rename it onto `out`; its result (frames and seconds of
        what the file holds). Raises ClientError when no frame or no `DoneEvent` came
        (the partial file is deleted)."""
        if self.writer is None or self.done is None:
            self.abort()
            raise ClientError("the job produced no frames")
        try:
            self.writer.close()
        except BaseException:
            self.abort()
            raise
        done = self.done
        # Report what the file holds, not what the job sent: the writer repeats the last
        # frame (1-3 times) so the video covers the audio's padding to a whole AAC frame.
        return RenderResult(self.out, self.writer.frames_written, self.writer.video_duration_s,
                            done.wall_s, done.first_frame_s, done.attempts)

    def abort(self) -> None:
        """Stop and delete the partial file; `out` is left as it was. Idempotent."""
        if self.writer is not None:
            self.writer.abort()
        self.pending_audio.clear()


def write_job_mp4(events: Iterator[Any], out: Path, fps: int, progress: Progress,
                  audio: tuple[np.ndarray, int] | None = None) -> RenderResult:
    """Mux a job's frames (and its audio events, or `audio` given by the caller) to mp4,
    each event as it comes (`JobMp4`)."""
    mp4 = JobMp4(out, fps, progress, audio)
    try:
        for event in events:
            mp4.feed(event)
        return mp4.finish()
    except BaseException:
        mp4.abort()
        raise
    finally:
        progress.done()


def render_to_mp4(endpoint: str | None, overrides: list[str], avatar: str | None,
                  out: Path, label: str, start_job: Callable[[Client, str], JobHandle],
                  audio: tuple[np.ndarray, int] | None = None) -> RenderResult:
    """The shared body of `avatard render` and `lipsync`: check the output path first,
    register the portrait if one is given (`avatar`: an image file, else the id of a
    portrait registered before), run the job and mux it."""
    from avatard.engines.mux import check_writable

    check_writable(out)
    image = read_file(avatar, "avatar") if avatar and Path(avatar).is_file() else None
    with connect(endpoint, overrides, sys.stderr) as client:
        avatar_id = client.register_avatar(image) if image else (avatar or "")
        job = start_job(client, avatar_id)
        fps = job.fps
        if not fps:
            sys.stderr.write(f"job {job.job_id} was accepted before any worker had loaded its "
                             f"engines, so its frame rate was not announced: writing the mp4 "
                             f"at {DEFAULT_FPS} fps\n")
            fps = DEFAULT_FPS
        return write_job_mp4(job, out, fps, Progress(sys.stderr, label), audio=audio)


def engine_overrides(engine: str | None, extra: tuple[str, ...]) -> list[str]:
    """The ``KEY=VALUE`` overrides of a private daemon: `extra` (--set items) and what
    `--engine` stands for, as for `avatard serve` (`engine_flag_overrides`: `fake` also
    fakes TTS and ASR unless `extra` sets them)."""
    overrides = list(extra)
    if engine:
        given = {item.split("=", 1)[0].strip() for item in extra}
        overrides += [f"{key}={value}"
                      for key, value in engine_flag_overrides(engine, given).items()]
    return overrides


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {what} {path}: {exc.strerror}", field=what) from None


