"""The browser's microphone as a live session's speech: the audio track a page sends is
decoded by aiortc (Opus -> s16 at 48 kHz), converted here to float32 mono at the session's
rate and sent as `live_audio` in 100 ms chunks while the viewer holds "talk".

Runs as one task per peer connection in the gateway's event loop. PyAV's resampler keeps
its state across frames, so chunk edges carry no clicks. Audio that arrives while nobody
talks is decoded and discarded (the browser keeps the track open so that talking starts
without renegotiating).
"""

from __future__ import annotations

import asyncio
import logging

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatard.ipc.async_client import AsyncLiveSession

log = logging.getLogger("avatard.web")

CHUNK_S = 0.1  # speech goes to the daemon in chunks this long (a microphone's usual pace)
# How often a silent track is looked at again: the session may have ended meanwhile.
RECHECK_S = 1.0


class Microphone:
    """Forwards one remote audio track into `session` while `talking`.

    `start_talking()` opens a new segment (`mic-1`, `mic-2`, ...); `stop_talking()` sends
    what is buffered and `live_end`s it. `on_first_input(segment_id)` is called when a
    segment's first chunk goes out (the gateway's speech-to-frame figure starts there)."""

    def __init__(self, track: MediaStreamTrack, session: AsyncLiveSession, on_first_input) -> None:
        self.track = track
        self.session = session
        self.segment_id = ""  # "" while not talking
        self._on_first_input = on_first_input
        self._count = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._sent_any = False
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=session.audio_rate)
        self._chunk_samples = int(session.audio_rate * CHUNK_S)

    async def start_talking(self) -> str:
        """Start a new segment of speech; returns its id."""
        if self.segment_id:
            await self.stop_talking()
        self._count += 1
        self.segment_id = f"mic-{self._count}"
        self._buffer, self._buffered, self._sent_any = [], 0, False
        return self.segment_id

    async def stop_talking(self) -> None:
        """Send the buffered rest and end the segment."""
        segment, self.segment_id = self.segment_id, ""
        if not segment:
            return
        if self._buffered:
            await self._send(segment, np.concatenate(self._buffer))
        self._buffer, self._buffered = [], 0
        if self._sent_any:
            await self.session.end_segment(segment)

    async def run(self) -> None:
        """Read the track until it ends (the peer went away) or the task is cancelled."""
        while True:
            try:
                frame = await asyncio.wait_for(self.track.recv(), RECHECK_S)
            except TimeoutError:
                continue  # the browser sends nothing while its track is not set: wait on
            except MediaStreamError:
                return
            if not self.segment_id:
                continue
            for out in self._resampler.resample(frame):
                pcm = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                self._buffer.append(pcm)
                self._buffered += pcm.size
            if self._buffered >= self._chunk_samples:
                chunk = np.concatenate(self._buffer)
                self._buffer, self._buffered = [], 0
                await self._send(self.segment_id, chunk)

    async def _send(self, segment: str, pcm: np.ndarray) -> None:
        if not self._sent_any:
            self._sent_any = True
            self._on_first_input(segment)
        await self.session.send_audio(
            np.ascontiguousarray(pcm, dtype=np.float32), self.session.audio_rate, segment
        )
