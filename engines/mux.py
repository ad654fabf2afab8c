"""Streaming mp4 writer (H.264 + AAC) on PyAV, and a reader that measures what was written.

Frames and audio arrive in any interleaving and any chunk sizes, as a talking-head job
produces them. Video timestamps count frames (time base 1/fps) and audio timestamps count
samples (time base 1/audio_rate), so both are exact integers and never drift. On close the
shorter track is padded (last frame repeated, or silence) so the two lengths agree within
one frame.

The file is written under a temporary name in the target's directory (`part_path`) and
renamed onto the target (`os.replace`, atomic within one file system) only when it is
complete: a writer that is aborted, or a process killed mid-write, never damages a file
that was at the target before, and a reader never sees a half-written mp4 there.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

# Tried in order; the first one this PyAV build can open is used. libx264 is in the PyAV
# wheels; the others cover builds of PyAV against a system FFmpeg without it.
VIDEO_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "mpeg4")
AUDIO_ENCODERS = ("aac", "libopus", "opus")
# AAC's standard sampling rates; other rates are resampled to 48 kHz in the encoder path.
_AAC_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})


def pick_encoder(candidates: tuple[str, ...]) -> str:
    """Name of the first encoder in `candidates` that this PyAV build provides."""
    import av
    from av.codec import Codec

    for name in candidates:
        if name not in av.codecs_available:
            continue
        try:
            Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        return name
    raise RuntimeError(f"none of the encoders {candidates} is available in this PyAV build")


def encoder_sample_format(name: str) -> str:
    """The float sample format an audio encoder accepts, preferring planar float."""
    from av.codec import Codec

    supported = [fmt.name for fmt in Codec(name, "w").audio_formats or ()]
    for preferred in ("fltp", "flt", "s16p", "s16"):
        if preferred in supported:
            return preferred
    return supported[0] if supported else "fltp"


def check_writable(path: Path) -> None:
    """Raise a clear error now if `path` cannot be created, before any encoding work."""
    if path.is_dir():
        raise IsADirectoryError(f"output path {path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"output file {path} exists and is not writable")


PART_SUFFIX = ".part"


def output_target(path: Path) -> Path:
    """The file an output to `path` replaces: the symlink's target when `path` is a
    symlink (renaming onto the link would replace the link, not the file it names)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def part_path(path: Path) -> Path:
    """A fresh temporary name for an output to `path`, in the same directory (so the
    final rename stays on one file system): hidden, `.NAME.<8 hex>.part`."""
    target = output_target(path)
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{PART_SUFFIX}")


class Mp4Writer:
    """Write an mp4 incrementally: `write_frame` RGB frames and `write_audio` PCM chunks.

    The frames go to a temporary file beside `path` (`part_path`); `close()` finishes it
    and renames it onto `path`, `abort()` deletes it. Until `close()` returns, whatever was
    at `path` stays as it was. Use as a context manager: if the block raises, the writer
    aborts. Raises like `check_writable` when `path` cannot be written, ValueError for bad
    sizes and rates.
    """

    def __init__(
        self,
        path: str | Path,
        fps: int,
        width: int,
        height: int,
        audio_rate: int,
        *,
        crf: int = 23,
        preset: str = "veryfast",
        audio_bitrate: int = 96_000,
        video_encoders: tuple[str, ...] = VIDEO_ENCODERS,
        audio_encoders: tuple[str, ...] = AUDIO_ENCODERS,
    ):
        self.path = Path(path)
        if not isinstance(fps, int) or not 1 <= fps <= 240:
            raise ValueError(f"fps must be an integer in 1..240, got {fps!r}")
        # yuv420p halves chroma resolution, so H.264 needs even frame sizes.
        for label, size in (("width", width), ("height", height)):
            if not isinstance(size, int) or size < 2 or size % 2:
                raise ValueError(f"{label} must be an even integer >= 2, got {size!r}")
        if not isinstance(audio_rate, int) or not 8000 <= audio_rate <= 192000:
            raise ValueError(f"audio_rate must be an integer in 8000..192000, got {audio_rate!r}")
        check_writable(self.path)

        import av

        self._av = av
        self.fps = fps
        self.width = width
        self.height = height
        self.audio_rate = audio_rate
        self.video_codec = pick_encoder(video_encoders)
        self.audio_codec = pick_encoder(audio_encoders)
        log.info("mp4 writer: video %s, audio %s", self.video_codec, self.audio_codec)

        self.part = part_path(self.path)
        self._container: Any = av.open(str(self.part), mode="w", format="mp4")
        try:
            self._video = self._container.add_stream(self.video_codec, rate=fps)
            self._video.width = width
            self._video.height = height
            self._video.pix_fmt = "yuv420p"
            self._frame_time_base = Fraction(1, fps)
            self._video.time_base = self._frame_time_base
            if self.video_codec == "libx264":
                self._video.options = {"crf": str(crf), "preset": preset}
            else:
                self._video.bit_rate = 2_000_000

            # Opus only runs at 48 kHz and AAC only at its standard rates; anything else
            # goes through libswresample inside the writer so callers never need to care.
            if self.audio_codec == "aac" and audio_rate in _AAC_RATES:
                self._encode_rate = audio_rate
            else:
                self._encode_rate = 48000
            self._audio = self._container.add_stream(self.audio_codec, rate=self._encode_rate)
            self._audio.layout = "mono"
            self._audio.bit_rate = audio_bitrate
            self._audio.time_base = Fraction(1, self._encode_rate)
            # Encoders want fixed-size frames (AAC 1024 samples, Opus 20 ms) in their own
            # sample format (native aac: planar float, libopus: packed float); the
            # resampler converts and cuts both for us.
            sample_format = encoder_sample_format(self.audio_codec)
            self._audio.format = sample_format
            self._codec_frame_size = 1024 if self.audio_codec == "aac" else 960
            self._resampler = av.AudioResampler(
                format=sample_format,
                layout="mono",
                rate=self._encode_rate,
                frame_size=self._codec_frame_size,
            )
        except BaseException:
            self._container.close()
            self.part.unlink(missing_ok=True)
            raise
        self.frames_written = 0
        self.samples_written = 0  # at `audio_rate`, as received from the caller
        self._last_frame: np.ndarray | None = None
        self._closed = False

    # ------------------------------------------------------------------ input

    def write_frame(self, frame: np.ndarray) -> None:
        """Append one (height, width, 3) uint8 RGB frame."""
        self._check_open()
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
            raise ValueError("frame must be a uint8 numpy array")
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(
                f"frame shape {frame.shape} != ({self.height}, {self.width}, 3) set at open"
            )
        video_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")
        video_frame.pts = self.frames_written
        # A fixed 1/fps: the stream's own time base changes (to 1/12800) once the mp4
        # header is written, and frame timestamps must keep meaning frame numbers.
        video_frame.time_base = self._frame_time_base
        self._container.mux(self._video.encode(video_frame))
        self.frames_written += 1
        self._last_frame = frame

    def write_audio(self, pcm: np.ndarray) -> None:
        """Append mono float32 PCM at `audio_rate`; any chunk size."""
        self._check_open()
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            return
        if not np.isfinite(samples).all():
            raise ValueError("audio contains NaN or infinite samples")
        audio_frame = self._av.AudioFrame.from_ndarray(
            np.clip(samples, -1.0, 1.0)[None, :], format="flt", layout="mono"
        )
        audio_frame.sample_rate = self.audio_rate
        audio_frame.pts = self.samples_written
        audio_frame.time_base = Fraction(1, self.audio_rate)
        self.samples_written += samples.size
        self._encode_audio(self._resampler.resample(audio_frame))

    def _encode_audio(self, frames: list[Any]) -> None:
        # The resampler hands back encoder-sized frames with pts in the encoder rate.
        for frame in frames:
            self._container.mux(self._audio.encode(frame))

    # ------------------------------------------------------------------ output

    @property
    def video_duration_s(self) -> float:
        return self.frames_written / self.fps

    @property
    def audio_duration_s(self) -> float:
        return self.samples_written / self.audio_rate

    def close(self) -> None:
        """Pad the shorter track, flush the encoders, finish the file and rename it onto
        `path`. On any error the temporary file is deleted and `path` left as it was."""
        if self._closed:
            return
        try:
            try:
                self._pad_to_equal_length()
                self._encode_audio(self._resampler.resample(None))
                self._container.mux(self._audio.encode(None))
                self._container.mux(self._video.encode(None))
            finally:
                self._closed = True
                self._container.close()
            os.replace(self.part, output_target(self.path))
        except BaseException:
            self.part.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Stop without finishing and delete the temporary file; `path` is left as it
        was."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except self._av.FFmpegError:
                log.debug("closing an aborted mp4 failed", exc_info=True)
        self.part.unlink(missing_ok=True)

    def _pad_to_equal_length(self) -> None:
        if self.frames_written == 0 and self.samples_written == 0:
            raise RuntimeError("nothing was written: an mp4 needs at least one frame")
        if self.frames_written == 0:
            # Audio without video: a black picture keeps the file playable.
            self.write_frame(np.zeros((self.height, self.width, 3), np.uint8))
        frames, audio_end_s = plan_padding(
            self.frames_written, self.audio_duration_s, self.fps, self._codec_frame_s
        )
        while self.frames_written < frames:
            assert self._last_frame is not None
            self.write_frame(self._last_frame)
        wanted_samples = round(audio_end_s * self.audio_rate)
        if self.samples_written < wanted_samples:
            self.write_audio(np.zeros(wanted_samples - self.samples_written, np.float32))

    @property
    def _codec_frame_s(self) -> float:
        return self._codec_frame_size / self._encode_rate

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the mp4 writer is closed")

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def plan_padding(frames: int, audio_s: float, fps: int, codec_frame_s: float) -> tuple[int, float]:
    """Choose the final frame count and audio end time (seconds) for a finished file.

    Decoders drop the AAC/Opus priming samples (the mp4 edit list says how many) but keep
    the zero padding of the last codec frame, so decoded audio lasts a whole number of codec
    frames (1024 samples: 64 ms at 16 kHz, more than a 40 ms video frame). We therefore
    pad the audio with real silence to a codec-frame boundary and pick the smallest video
    length, no shorter than what was written, that ends within half a frame of it. Nothing
    written is ever dropped.
    """
    half_frame_s = 0.5 / fps
    first = max(frames, round(audio_s * fps))
    # The grid positions repeat within lcm(frame, codec frame); a few thousand frames
    # covers every sane pair, and the fallback keeps the length error under one codec frame.
    for candidate in range(first, first + 4096):
        video_s = candidate / fps
        floor_s = max(audio_s, video_s - half_frame_s)
        audio_end_s = math.ceil(floor_s / codec_frame_s - 1e-9) * codec_frame_s
        if audio_end_s <= video_s + half_frame_s + 1e-9:
            return candidate, audio_end_s
    return first, max(audio_s, first / fps)


class Mp4Info(NamedTuple):
    frame_count: int
    video_duration_s: float
    audio_duration_s: float


def read_mp4(path: str | Path) -> Mp4Info:
    """Decode an mp4 fully and measure it: (frames, video seconds, audio seconds).

    Durations come from decoding rather than container metadata, because what a player
    shows is what decodes: video is frames / frame rate, audio is decoded samples / rate
    (the container's edit list removes the AAC encoder's priming samples on decode).
    """
    import av

    with av.open(str(path)) as container:
        video_stream = container.streams.video[0] if container.streams.video else None
        audio_stream = container.streams.audio[0] if container.streams.audio else None
        frame_count = 0
        audio_samples = 0
        streams = [s for s in (video_stream, audio_stream) if s is not None]
        for frame in container.decode(*streams):
            if isinstance(frame, av.VideoFrame):
                frame_count += 1
            else:
                audio_samples += frame.samples
        video_s = 0.0
        if video_stream is not None and frame_count:
            rate = video_stream.average_rate or video_stream.guessed_rate
            video_s = frame_count / float(rate) if rate else 0.0
        audio_s = audio_samples / audio_stream.rate if audio_stream is not None else 0.0
    return Mp4Info(frame_count, video_s, audio_s)
