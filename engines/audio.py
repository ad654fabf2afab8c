"""Audio and text input handling shared by the speech engines.

Everything here turns caller input into the form the engines expect (mono float32 PCM at a
known rate, clean text in sentence-sized pieces) or raises `EngineInputError` naming the
field and the rule it broke, so a bad request never reaches a model.

PyAV decodes files. Resampling of PCM uses our own numpy windowed-sinc filter rather than
scipy's `resample_poly`: scipy is not in the embedded install, one code path keeps output
identical across installs, and its default filter leaves aliases at about -30 dB near the
new Nyquist where ours rejects about -90 dB (tests/test_audio.py asserts better than -60).
"""

from __future__ import annotations

import io
import logging
import math
import re
import unicodedata
from pathlib import Path

import numpy as np

from avatard.ipc.protocol import seconds_over

from .base import EngineInputError

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
DEFAULT_MAX_DURATION_S = 600.0
DEFAULT_MAX_TEXT_CHARS = 5000
# Codecs (mp3, aac) overshoot full scale a little after decoding; above this the input is
# almost certainly integer PCM handed over as float, which would be pure clipping noise.
MAX_FLOAT_PEAK = 2.0
MAX_CHANNELS = 6
# A file that decodes to less than this holds no audio anyone could hear (a 100 Hz voice
# has not finished one period): a header with a few stray bytes, not a recording.
MIN_FILE_AUDIO_S = 0.01
WAV_HEAD_BYTES = 4096  # where a WAV's fmt and data chunk headers are looked for

log = logging.getLogger("avatard.audio")

# ---------------------------------------------------------------------------- PCM checks


def validate_sample_rate(sample_rate: object, field: str = "sample_rate") -> int:
    """Return the rate as an int, or raise if it is not an integer in the supported range."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise EngineInputError(field, f"must be an integer, got {type(sample_rate).__name__}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise EngineInputError(
            field, f"must be within {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {rate}"
        )
    return rate


def validate_pcm(
    pcm: object,
    sample_rate: object,
    *,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    field: str = "audio",
    limit_key: str = "",
) -> tuple[np.ndarray, int]:
    """Check caller PCM and return it as (1-D C-contiguous float32 in [-1, 1], rate).

    Accepts float arrays of shape (n,) or (n, 1). Integer arrays are refused instead of
    being guessed at: int16 and int32 need different scales and the caller knows which.
    Raises `EngineInputError` naming `field` (or "sample_rate"); past `max_duration_s`
    its rule gives the length, the limit and `limit_key`, the config key that sets the
    limit (e.g. "engines.options.embedded.max_duration_s"), when the caller names one.
    """
    rate = validate_sample_rate(sample_rate)
    if not isinstance(pcm, np.ndarray):
        raise EngineInputError(field, f"must be a numpy array, got {type(pcm).__name__}")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise EngineInputError(field, f"must be float PCM in [-1, 1], got dtype {pcm.dtype}")
    samples = pcm
    if samples.ndim == 2 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 1:
        raise EngineInputError(field, f"must be mono (1-D), got shape {tuple(pcm.shape)}")
    if samples.size == 0:
        raise EngineInputError(field, "is empty (0 s of audio)")
    duration_s = samples.size / rate
    if duration_s > max_duration_s:
        where = f" ({limit_key})" if limit_key else ""
        raise EngineInputError(
            field, f"is {seconds_over(duration_s, max_duration_s)} s long; the limit is "
            f"{max_duration_s:g} s{where}"
        )
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        samples = np.ascontiguousarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise EngineInputError(field, "contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > MAX_FLOAT_PEAK:
        raise EngineInputError(
            field, f"samples must lie in [-1, 1], peak is {peak:.3g} (integer PCM as float?)"
        )
    if peak > 1.0:
        samples = np.clip(samples, -1.0, 1.0)
    return samples, rate


# ---------------------------------------------------------------------------- decoding


def decode_audio(
    source: str | Path | bytes,
    target_rate: int | None = None,
    *,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    field: str = "audio",
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a file (wav, mp3, ogg, flac, m4a...) to mono
    float32 (the mean of the channels). Optional resampling happens in libswresample,
    which filters properly. Returns (pcm, rate): rate is `target_rate` if given, else the
    file's own.

    A file cut short (a recording whose header announces more than the file holds, or
    whose last packet is broken) gives what could be decoded, with a warning on the
    `avatard.audio` logger. Raises `EngineInputError` naming `field` for a file that is
    not audio, holds less than MIN_FILE_AUDIO_S of it, or is over `max_duration_s`."""
    import av  # deferred: importing PyAV costs ~0.1 s and most callers pass PCM

    if target_rate is not None:
        validate_sample_rate(target_rate, "target_rate")
    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        container = av.open(opened, mode="r")
    except (av.FFmpegError, OSError) as error:
        raise EngineInputError(field, f"is not a decodable audio file ({error})") from error
    with container:
        if not container.streams.audio:
            raise EngineInputError(field, "contains no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise EngineInputError(field, "has an audio stream no decoder can read")
        channels = stream.codec_context.channels or 1
        if channels > MAX_CHANNELS:
            # PyAV 18 crashes (SIGSEGV) converting planar frames of 8+ channels; speech
            # never needs more than 5.1, so refuse before decoding anything.
            raise EngineInputError(field, f"has {channels} channels; at most {MAX_CHANNELS} "
                                   "are accepted")
        source_rate = stream.codec_context.sample_rate or stream.rate
        if not source_rate:
            raise EngineInputError(field, "has no sample rate")
        # A header may claim any rate; resampling from 100 MHz costs seconds per
        # millisecond of audio, so the file's own rate must be sane before any decoding.
        validate_sample_rate(int(source_rate))
        out_rate = target_rate or int(source_rate)
        validate_sample_rate(out_rate)
        # Channels stay separate through libswresample and are averaged here: its own
        # stereo-to-mono matrix sums at -3 dB each, which overshoots full scale by 41% on
        # correlated (centre-panned) material.
        layout = stream.layout if stream.layout and stream.layout.nb_channels else "mono"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        max_samples = int(max_duration_s * out_rate)
        pieces: list[np.ndarray] = []
        total = 0
        broken = ""
        try:
            for frame in container.decode(stream):
                for converted in resampler.resample(frame):
                    piece = converted.to_ndarray().mean(axis=0, dtype=np.float32)
                    pieces.append(piece)
                    total += piece.size
                # Refuse during decoding so a multi-hour upload costs no more than the limit.
                if total > max_samples:
                    raise EngineInputError(
                        field, f"is longer than the limit of {max_duration_s:g} s"
                    )
        except av.FFmpegError as error:
            # A cut-off file ends in a piece of a packet (half a sample): keep the rest.
            broken = f"could not be decoded past {total / out_rate:.2f} s ({error})"
        try:
            for converted in resampler.resample(None):
                pieces.append(converted.to_ndarray().mean(axis=0, dtype=np.float32))
        except av.FFmpegError as error:  # nothing left to flush is no loss
            broken = broken or f"its last samples could not be resampled ({error})"
    pcm = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    held_s = pcm.size / out_rate
    announced_s = _wav_announced_s(source)
    short = (f"its header announces {announced_s:.2f} s of audio, the file holds "
             f"{held_s:.2f} s" if announced_s is not None and held_s < announced_s - 0.01
             else "")
    if held_s < MIN_FILE_AUDIO_S:
        why = "; ".join(filter(None, (short, broken))) or "nothing else is in it"
        raise EngineInputError(field, f"holds no audio: {held_s * 1000:.1f} ms, at least "
                               f"{MIN_FILE_AUDIO_S * 1000:g} ms is needed ({why})")
    if short or broken:
        log.warning("%s: the file is cut short or damaged: %s; using the %.2f s there are",
                    field, "; ".join(filter(None, (short, broken))), held_s)
    return validate_pcm(pcm, out_rate, max_duration_s=max_duration_s, field=field)


def _wav_announced_s(source: str | Path | bytes) -> float | None:
    """Seconds of audio a RIFF/WAVE header says its data chunk holds; None for another
    format, a header that cannot be read, or a streaming writer's placeholder size (0 or
    0xFFFFFFFF: the length was never filled in). FFmpeg reports the length the file's size
    allows, so a cut-short WAV is only seen by reading the header itself."""
    try:
        if isinstance(source, bytes):
            head = source[:WAV_HEAD_BYTES]
        else:
            with open(source, "rb") as file:
                head = file.read(WAV_HEAD_BYTES)
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset, byte_rate = 12, 0
    while offset + 8 <= len(head):
        chunk_id = head[offset:offset + 4]
        size = int.from_bytes(head[offset + 4:offset + 8], "little")
        if chunk_id == b"fmt " and offset + 16 <= len(head):
            byte_rate = int.from_bytes(head[offset + 16:offset + 20], "little")
        elif chunk_id == b"data":
            if not byte_rate or size in (0, 0xFFFFFFFF):
                return None
            return size / byte_rate
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


# ---------------------------------------------------------------------------- resampling


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Anti-aliased rational resampling of mono float32 PCM.

    The output has ceil(len * to_rate / from_rate) samples and is aligned with the input
    (no filter delay), so timings computed at one rate hold at the other.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    samples = np.asarray(pcm, dtype=np.float32)
    if from_rate == to_rate or samples.size == 0:
        return samples.copy()
    divisor = math.gcd(int(from_rate), int(to_rate))
    up, down = int(to_rate) // divisor, int(from_rate) // divisor
    return _resample_sinc(samples, up, down)


# Half-width of the interpolation kernel in input samples at the cutoff frequency; 32
# zero crossings with a Kaiser(8.6) window gives about 80 dB stop-band rejection.
_SINC_HALF_ZEROS = 32
_KAISER_BETA = 8.6
_SINC_BLOCK = 4096  # outputs per block of the direct path: (block x taps) float64 temporaries
_MAX_PHASE_TABLE = 4096
# The polyphase path makes one strided product per phase: worth it once each phase has a
# few outputs; below that the direct path costs less than the per-phase call overhead.
_POLYPHASE_MIN_ROWS = 4


class _SincFilter:
    """The filter of one rate pair (output n sits at input time n * down / up): output n
    reads input samples (n * down // up) + `offsets`, weighted by the kernel row of its
    phase (n * down % up). `table` holds every phase's row when there are at most
    `_MAX_PHASE_TABLE` phases (ordinary pairs: 44100 -> 16000 has 160), else None and rows
    are computed per output."""

    def __init__(self, up: int, down: int):
        self.up, self.down = up, down
        # Cutoff as a fraction of the input Nyquist; when downsampling the kernel widens by
        # the same factor so its number of zero crossings (and so its rejection) stays.
        self.cutoff = min(1.0, up / down)
        self.half_width = int(math.ceil(_SINC_HALF_ZEROS / self.cutoff))
        self.offsets = np.arange(-self.half_width + 1, self.half_width + 1)
        self.table = self.kernel(np.arange(up) / up) if up <= _MAX_PHASE_TABLE else None

    def kernel(self, frac: np.ndarray) -> np.ndarray:
        """Kernel rows (len(frac), taps) float64 for fractional positions `frac` in [0, 1)."""
        distance = frac[:, None] - self.offsets[None, :]  # t - k for every tap
        ratio = np.clip(distance / self.half_width, -1.0, 1.0)
        window = np.i0(_KAISER_BETA * np.sqrt(1.0 - ratio * ratio)) / np.i0(_KAISER_BETA)
        return self.cutoff * np.sinc(self.cutoff * distance) * window

    def outputs(self, buffer: np.ndarray, buffer_start: int, first: int, end: int
                ) -> np.ndarray:
        """Outputs `first`..`end` - 1 as float32, from `buffer` (1-D contiguous float64
        holding input samples from absolute index `buffer_start` on, and every sample those
        outputs read: the caller guarantees it; a shortfall raises ValueError). Memory stays
        O(outputs + taps) whatever the length: no (outputs x taps) gather of the whole
        input, which made a 10 s chunk cost seconds."""
        count = end - first
        output = np.empty(max(0, count), np.float64)
        if count <= 0:
            return output.astype(np.float32)
        up, down, offsets = self.up, self.down, self.offsets
        taps = offsets.size
        last_read = (end - 1) * down // up + int(offsets[-1]) - buffer_start
        if (first * down // up + int(offsets[0]) - buffer_start < 0
                or last_read >= buffer.size):
            raise ValueError(f"resampler buffer holds inputs {buffer_start}.."
                             f"{buffer_start + buffer.size - 1}; outputs {first}..{end - 1} "
                             "read beyond them")
        if self.table is not None and count >= _POLYPHASE_MIN_ROWS * up:
            # Polyphase: outputs r, r + up, r + 2 up... share a phase, and their taps start
            # `down` inputs apart, so they are one strided (rows x taps) view of the buffer
            # (no copy) times that phase's kernel row.
            item = buffer.itemsize
            for r in range(up):
                n = first + r
                start = n * down // up + int(offsets[0]) - buffer_start
                rows = -(-(end - n) // up)
                view = np.lib.stride_tricks.as_strided(
                    buffer[start:], shape=(rows, taps), strides=(down * item, item),
                    writeable=False)
                output[r::up] = np.einsum("ij,j->i", view, self.table[n * down % up])
        else:
            for block in range(first, end, _SINC_BLOCK):
                index = np.arange(block, min(block + _SINC_BLOCK, end), dtype=np.int64)
                reads = (index * down // up)[:, None] + offsets[None, :] - buffer_start
                phase = (index * down) % up
                rows = self.table[phase] if self.table is not None else self.kernel(phase / up)
                output[block - first:block - first + index.size] = np.einsum(
                    "ij,ij->i", buffer[reads], rows)
        return output.astype(np.float32)


def _resample_sinc(samples: np.ndarray, up: int, down: int) -> np.ndarray:
    """Windowed-sinc band-limited interpolation, evaluated directly at each output time.

    Output sample n sits at input time t = n * down / up. Its value is the sum over nearby
    input samples k of x[k] * h(t - k), where h is a Kaiser-windowed sinc low-pass at the
    lower of the two Nyquist frequencies (input outside the signal reads as 0).
    """
    sinc = _SincFilter(up, down)
    half_width = sinc.half_width
    padded = np.concatenate(
        [np.zeros(half_width), samples.astype(np.float64), np.zeros(half_width + 1)]
    )
    return sinc.outputs(padded, -half_width, 0, -(-samples.size * up // down))


class StreamingResampler:
    """`resample` for audio that arrives in chunks (a live session's speech): the outputs
    of `push` for each chunk and then `flush` joined are `resample` of the chunks joined
    (to float32 rounding: both sum the same products, possibly grouped differently), so
    chunk edges add no clicks. Each push returns the output samples whose filter taps
    have all arrived; the rest (about 32 input samples at the lower Nyquist: 2 ms at
    16 kHz) waits for the next chunk or `flush`. Input and output are 1-D float32. The
    work of a push is linear in its chunk (about 15 ms per second of 48 kHz input on one
    core), so a caller with a deadline pushes a big chunk in pieces."""

    def __init__(self, from_rate: int, to_rate: int):
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        divisor = math.gcd(int(from_rate), int(to_rate))
        self.up, self.down = int(to_rate) // divisor, int(from_rate) // divisor
        self.passthrough = from_rate == to_rate
        self._sinc = _SincFilter(self.up, self.down)
        self._half_width = self._sinc.half_width
        # Input from absolute index `_start` on; indices below 0 are the zeros that
        # `_resample_sinc` pads with, so the first outputs match it too.
        self._buffer = np.zeros(self._half_width, np.float64)
        self._start = -self._half_width
        self._received = 0
        self._next_out = 0
        self.flushed = False

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Take the next chunk; returns the output samples now computable (maybe none)."""
        if self.flushed:
            raise RuntimeError("push() after flush() on a StreamingResampler")
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._received += samples.size
        if self.passthrough:
            return samples.copy()
        self._buffer = np.concatenate([self._buffer, samples.astype(np.float64)])
        # Output n needs input up to (n * down // up) + half_width: all of it arrived.
        last_input = self._received - 1 - self._half_width
        return self._compute(-(-(last_input + 1) * self.up // self.down))

    def flush(self) -> np.ndarray:
        """No more input: the remaining output samples (input past the end reads as 0)."""
        self.flushed = True
        if self.passthrough:
            return np.zeros(0, np.float32)
        self._buffer = np.concatenate([self._buffer, np.zeros(self._half_width + 1)])
        return self._compute(-(-self._received * self.up // self.down))

    def output_for(self, samples: int) -> int:
        """About how many output samples `samples` more input makes (for planning)."""
        return samples if self.passthrough else samples * self.up // self.down

    def input_for(self, samples: int) -> int:
        """Input samples that make at least `samples` more output, past the ones held
        back for the filter's taps (for planning how much of a big chunk to push)."""
        if self.passthrough:
            return samples
        return -(-samples * self.down // self.up) + self._half_width + 1

    def _compute(self, end: int) -> np.ndarray:
        if end <= self._next_out:
            return np.zeros(0, np.float32)
        output = self._sinc.outputs(self._buffer, self._start, self._next_out, end)
        self._next_out = end
        # Keep only the input that later outputs can still reach.
        keep_from = (end * self.down) // self.up + int(self._sinc.offsets[0])
        if keep_from > self._start:
            self._buffer = self._buffer[keep_from - self._start:]
            self._start = keep_from
        return output


# ---------------------------------------------------------------------------- text


# Cc holds C0/C1 controls (NUL, ESC, DEL...); Cs lone surrogates, which cannot be encoded.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})
_WHITESPACE_RUN = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def clean_text(text: str) -> str:
    """Controls dropped, NFC, tabs and single newlines as spaces, and blank lines kept as
    one paragraph break; no refusals (`validate_text` adds those)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    paragraphs = _BLANK_LINES.split(text)
    cleaned_paragraphs = []
    for paragraph in paragraphs:
        kept = "".join(
            " " if ch in "\n\t\v\f" else ch
            for ch in paragraph
            if ch in "\n\t\v\f" or unicodedata.category(ch) not in _DROPPED_CATEGORIES
        )
        kept = _WHITESPACE_RUN.sub(" ", kept).strip()
        if kept:
            cleaned_paragraphs.append(kept)
    return "\n\n".join(cleaned_paragraphs)


def validate_text(text: object, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Return text ready for synthesis or raise naming `text`.

    Control characters are removed (newlines and tabs become spaces, except that a blank
    line is kept as a paragraph break), Unicode is NFC-normalised, and the text must hold
    something speakable: at least one letter or digit.
    """
    if not isinstance(text, str):
        raise EngineInputError("text", f"must be a string, got {type(text).__name__}")
    # Checked on the raw input first so a megabyte of text is refused before any work.
    if len(text) > max_chars:
        raise EngineInputError("text", f"is {len(text)} characters long; the limit is {max_chars}")
    cleaned = clean_text(text)
    if not cleaned:
        raise EngineInputError("text", "is empty")
    if not any(ch.isalnum() for ch in cleaned):
        raise EngineInputError("text", "has nothing speakable (no letter or digit)")
    return cleaned


# Words after which a period never ends a sentence: titles and labels that always precede
# something ("Dr. Smith", "No. 5"). Lower-case, without the period.
_TITLES = frozenset("mr mrs ms dr prof sr jr st mt ft vs no fig vol dept approx".split())
# Words that end a sentence only when a capital letter follows ("5 p.m. Then" splits,
# "5 p.m. today" does not); dotted abbreviations (e.g., p.m.) are treated the same.
_ABBREVIATIONS = frozenset(
    "etc inc ltd co jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
# A sentence end: terminal punctuation, optional closing quotes/brackets, then space.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s)|\n\n")
_CLAUSE_BREAK = re.compile(r"[,;:\u2014\u2013]\s")
DEFAULT_MAX_SENTENCE_CHARS = 300


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_SENTENCE_CHARS) -> list[str]:
    """Split clean text into sentences for streaming synthesis.

    A sentence ends at . ! ? (or a paragraph break) followed by whitespace, unless the
    word before the period is a known abbreviation or a single letter (an initial).
    Sentences longer than `max_chars` are cut at clause punctuation, then at spaces, so
    the first audio of a long run-on sentence is not delayed. Pieces with no letter or
    digit are merged into their neighbour instead of being spoken alone.
    """
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        candidate = text[start:end]
        if match.group().startswith(".") and not _period_ends_sentence(candidate, text[end:]):
            continue
        sentences.append(candidate)
        start = end
    sentences.append(text[start:])

    pieces: list[str] = []
    for sentence in sentences:
        sentence = sentence.strip()
        if not sentence:
            continue
        for piece in _cut_long(sentence, max_chars):
            if pieces and not any(ch.isalnum() for ch in piece):
                pieces[-1] = f"{pieces[-1]} {piece}"
            elif pieces and not any(ch.isalnum() for ch in pieces[-1]):
                pieces[-1] = f"{pieces[-1]} {piece}"
            else:
                pieces.append(piece)
    return pieces


def pack_sentences(text: str, max_chars: int) -> list[str]:
    """Text cut into pieces of at most `max_chars` characters for a TTS engine that takes
    no more in one call (its `max_text_chars`): at sentence ends (`split_sentences`), a
    sentence longer than that at a clause mark, then at a space, then anywhere; whole
    sentences are packed together up to the limit, so a long reply is a few calls, not
    one per sentence. Pieces with no letter or digit join a neighbour. "" -> []."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    pieces: list[str] = []
    for sentence in split_sentences(text, max_chars):
        # A piece that joined a neighbour may have grown past the limit: cut it again.
        for part in _cut_long(sentence, max_chars) if len(sentence) > max_chars else [sentence]:
            if pieces and len(pieces[-1]) + 1 + len(part) <= max_chars:
                pieces[-1] = f"{pieces[-1]} {part}"
            else:
                pieces.append(part)
    return pieces


def complete_sentences(text: str) -> tuple[str, str]:
    """Streamed text (an LLM's tokens so far) -> (its complete sentences, the rest still
    being written). A sentence is complete once the whitespace after its end arrived and
    no later text can change that: a period after an abbreviation ("etc.", "p.m.") waits
    for the next word, whose capital letter decides. The complete part goes to the TTS,
    which splits it into sentences itself; at the end of the text everything is spoken."""
    cut = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        candidate, following = text[cut:end], text[end:]
        if match.group().startswith("."):
            if not following.strip() and _waits_for_next_word(candidate):
                break  # "... etc. " then nothing yet: the next word decides
            if not _period_ends_sentence(candidate, following):
                continue
        cut = end
    return text[:cut], text[cut:]


def _waits_for_next_word(candidate: str) -> bool:
    words = candidate.rstrip("\"'\u201d\u2019)]").rstrip(".").split()
    last = words[-1].lower().lstrip("\"'(\u201c\u2018[") if words else ""
    return last in _ABBREVIATIONS or "." in last


def _period_ends_sentence(candidate: str, rest: str) -> bool:
    words = candidate.rstrip("\"'\u201d\u2019)]").rstrip(".").split()
    if not words:
        return True
    last = words[-1].lower().lstrip("\"'(\u201c\u2018[")
    if last in _TITLES or (len(last) == 1 and last.isalpha()):
        return False  # a title or an initial: "Dr. Smith", "J. R. Tolkien"
    if last in _ABBREVIATIONS or "." in last:
        following = rest.lstrip()
        return not following or following[0].isupper()
    return True


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    remaining = sentence
    while len(remaining) > max_chars:
        window = remaining[:max_chars]
        breaks = [m.end() for m in _CLAUSE_BREAK.finditer(window)]
        # Prefer a clause break in the second half so pieces are not tiny.
        cut = next((b for b in reversed(breaks) if b > max_chars // 2), 0)
        if not cut:
            cut = window.rfind(" ") + 1
        if cut <= 0:
            cut = max_chars  # one enormous word: cut it anyway rather than stall
        pieces.append(remaining[:cut].strip())
        remaining = remaining[cut:].strip()
    if remaining:
        pieces.append(remaining)
    return pieces


LIPSYNC_CHUNK_S = 0.2  # seconds of audio per avatar-stream push after the first frame's


def lipsync_chunks(pcm: np.ndarray, rate: int, fps: int = 25):
    """How a lipsync job's audio is fed to an avatar stream (the worker and the benches
    feed it the same way): a first chunk of one frame's audio (`rate // fps` samples), so
    the first frame leaves as soon as the engine can make it, then chunks of
    LIPSYNC_CHUNK_S seconds, which cost less per frame. `pcm`: 1-D float32 at `rate` Hz;
    yields 1-D views of it, none empty."""
    first = max(1, rate // fps)
    yield pcm[:first]
    step = max(1, int(rate * LIPSYNC_CHUNK_S))
    for start in range(first, pcm.size, step):
        yield pcm[start : start + step]
