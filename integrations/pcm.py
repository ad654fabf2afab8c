"""Audio sample formats between the voice-agent frameworks and avatard.

LiveKit's `rtc.AudioFrame` and Pipecat's audio frames carry signed 16-bit PCM, channels
interleaved; avatard's live sessions take and give float32 mono in [-1, 1]. These two
conversions, and `send_pcm` which hands the result to a session, are the only place the
adapters touch samples.
"""

from __future__ import annotations

import numpy as np

__all__ = ["int16_to_float_mono", "float_to_int16", "send_pcm"]

INT16_SCALE = 32768.0  # full scale of signed 16-bit PCM


def int16_to_float_mono(data: bytes | memoryview | np.ndarray, num_channels: int) -> np.ndarray:
    """Interleaved signed 16-bit PCM -> float32 mono in [-1, 1).

    `data`: the samples as bytes (native byte order, as both frameworks keep them) or an
    int16 array; `num_channels` >= 1 interleaved channels, averaged into one. Returns a
    new (samples,) float32 array. Raises `ValueError` when the byte count is not a whole
    number of 16-bit samples times `num_channels`, or `num_channels` < 1."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    samples = (
        np.frombuffer(data, dtype=np.int16)
        if not isinstance(data, np.ndarray)
        else np.asarray(data, dtype=np.int16).reshape(-1)
    )
    if samples.size % num_channels:
        raise ValueError(
            f"{samples.size} int16 samples do not split into {num_channels} interleaved channels"
        )
    pcm = samples.astype(np.float32) / INT16_SCALE
    if num_channels > 1:
        pcm = pcm.reshape(-1, num_channels).mean(axis=1, dtype=np.float32)
    return pcm


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 mono in [-1, 1] -> (samples,) int16, clipped at full scale (an avatard
    audio chunk is exactly what the frame was made from; only a sample at +1.0 clips)."""
    scaled = np.rint(np.asarray(pcm, dtype=np.float32) * INT16_SCALE)
    return np.clip(scaled, -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


async def send_pcm(session, pcm: np.ndarray, sample_rate: int, segment_id: str) -> None:
    """Send float32 mono `pcm` at `sample_rate` Hz as speech of `segment_id` on an
    `AsyncClient` live session, in as many `live_audio` chunks as the daemon's
    `max_payload_bytes` requires (a TTS may hand over seconds at once). Raises what
    `LiveSession.send_audio` raises."""
    step = max(1, session.client.max_payload_bytes // pcm.itemsize)
    for start in range(0, pcm.size, step):
        await session.send_audio(pcm[start : start + step], sample_rate, segment_id)
