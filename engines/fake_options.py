"""`FakeOptions`: the `[engines.options.fake]` table shared by the three fake engines.

Torch-free and engine-free: the supervisor imports it to validate the config. The engines
themselves are in `engines/fake.py`, which describes what each fault does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import WorkerContext
from .options import OptionConflict, option

ENGINE_KINDS = ("avatar", "tts", "asr")


@dataclass(frozen=True, kw_only=True)
class FakeOptions:
    """Options of the fake avatar, TTS and ASR engines. The load options apply only to the
    engine kinds in `load_kinds`, because one worker loads all three from the same table;
    the faults (load_hang, load_crash, load_oom, load_error, alloc_mb, *_at_frame) can be
    aimed at workers and load attempts."""

    load_s: float = option(0.0, "Seconds a load takes; progress is reported along the way.",
                           ge=0)
    load_hang: bool = option(False, "Hang forever in the middle of loading.")
    load_crash: bool = option(False, "Exit abruptly (os._exit) in the middle of loading.")
    load_oom: bool = option(False, "Raise MemoryError in the middle of loading.")
    load_error: bool = option(False, "Raise RuntimeError in the middle of loading.")
    alloc_mb: int = option(0, "MiB allocated and touched at load, and kept (resident memory).",
                           ge=0)
    load_kinds: tuple[str, ...] = option(
        ("avatar",), "Engine kinds that apply the load options above.",
        choices=ENGINE_KINDS, choices_name="engine kinds",
    )
    frame_ms: float = option(0.0, "Compute time per avatar frame, in ms.", ge=0)
    frame_busy: bool = option(
        False, "Spend frame_ms busy-waiting (CPU load) instead of sleeping."
    )
    hang_at_frame: int = option(
        -1, "Hang forever before producing this frame index (-1: never).", ge=-1
    )
    crash_at_frame: int = option(
        -1, "Exit abruptly before producing this frame index (-1: never).", ge=-1
    )
    error_at_frame: int = option(
        -1, "Raise RuntimeError before producing this frame index (-1: never).", ge=-1
    )
    width: int = option(64, "Frame width in pixels.", ge=8, le=4096, multiple_of=2)
    height: int = option(64, "Frame height in pixels.", ge=8, le=4096, multiple_of=2)
    portrait_size: bool = option(
        False, "Render a registered portrait at its own size, as Ditto does (an image file's "
        "width x height, read from its header; an array's shape), instead of width x height; "
        "the default portrait stays width x height.",
    )
    fps: int = option(25, "Frames per second of the avatar engine.", ge=1)
    cache_size: int = option(
        64, "Registered avatars kept (least recently used goes first).", ge=1, le=65536
    )
    avatar_state_kb: int = option(
        0, "KiB of memory each registered avatar's state holds and touches (a stand-in for "
        "a real engine's per-portrait tensors, so cache bounds show in RSS).", ge=0,
    )
    audio_rate: int = option(
        16000, "Sample rate (Hz) of the audio pushed into avatar streams.", ge=1000
    )
    lookahead_frames: int = option(
        0, "Live streams: frames of audio past frame k needed before frame k is returned "
        "(Ditto's online scheme needs 21).", ge=0, le=250,
    )
    burst_frames: int = option(
        1, "Live streams: frames returned in groups of this many (Ditto's online scheme "
        "returns 10 at once); at most lookahead_frames + 1.", ge=1, le=250,
    )
    sentence_ms: float = option(0.0, "Compute time per synthesized TTS sentence, in ms.", ge=0)
    transcribe_ms_per_s: float = option(
        0.0, "ASR compute time per second of input audio, in ms; progress is reported after "
        "each second, as a real engine reports each piece.", ge=0,
    )
    transcribe_hang_at_s: float = option(
        -1.0, "ASR: hang forever when the transcription reaches this second of the input "
        "(-1: never).", ge=-1,
    )
    tts_max_text_chars: int = option(
        0, "Longest text the fake TTS takes in one call, in characters, as a real voice's "
        "max_text_chars (longer text is refused: bad_input/text); 0: no limit.", ge=0,
    )
    tts_refuse_word: str = option(
        "", "The fake TTS refuses text holding this word (any case; bad_input/text), as a "
        "real voice refuses a script it cannot read; \"\": refuses nothing.",
    )
    fault_workers: tuple[int, ...] | None = option(
        None, "Worker indices (0-based) the faults apply to.", ge=0, default_doc="every worker"
    )
    fault_attempts: tuple[int, ...] | None = option(
        None, "Load attempts (1-based) the faults apply to.", ge=1, default_doc="every attempt"
    )
    # Per-fault worker lists, so one config can mix faults (3 hang, 2 crash...).
    load_hang_workers: tuple[int, ...] = option(
        (), "Workers that hang while loading whatever load_hang says (still restricted by "
        "fault_attempts).", ge=0,
    )
    load_crash_workers: tuple[int, ...] = option(
        (), "Workers that crash while loading whatever load_crash says (still restricted by "
        "fault_attempts).", ge=0,
    )
    load_oom_workers: tuple[int, ...] = option(
        (), "Workers that run out of memory while loading whatever load_oom says (still "
        "restricted by fault_attempts).", ge=0,
    )
    crash_delay_s: float = option(
        0.1, "Pause before an injected crash, in seconds (lets logs reach the pipe).", ge=0
    )
    crash_exit_code: int = option(
        70, "Exit status of an injected crash (70: EX_SOFTWARE).", ge=1, le=255
    )

    def __post_init__(self) -> None:
        if self.burst_frames > self.lookahead_frames + 1:
            raise OptionConflict("burst_frames", f"{self.burst_frames} is more than "
                                 f"lookahead_frames + 1 = {self.lookahead_frames + 1} (a "
                                 "frame would leave before its own audio is complete)")

    def faults_apply(self, context: WorkerContext) -> bool:
        """Whether the faults target this worker and load attempt."""
        worker_matches = self.fault_workers is None or context.worker_index in self.fault_workers
        return worker_matches and self._attempt_matches(context)

    def load_fault(self, flag: bool, workers: tuple[int, ...], context: WorkerContext) -> bool:
        """Whether one load fault strikes here: by its flag (restricted by fault_workers)
        or because this worker is in the fault's own worker list."""
        in_list = context.worker_index in workers and self._attempt_matches(context)
        return (flag and self.faults_apply(context)) or in_list

    def _attempt_matches(self, context: WorkerContext) -> bool:
        return self.fault_attempts is None or context.attempt in self.fault_attempts
