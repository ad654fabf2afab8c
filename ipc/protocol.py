"""Every message avatard sends over ZeroMQ: the single source of truth for the protocol.

Wire format (documented for other languages in docs/protocol.md):
- A message is a ZeroMQ multipart message. Part 0 is a msgpack map with at least
  ``type`` (str) and ``v`` (int, the protocol version). Further parts are raw bytes that a
  message refers to by index (`Inline.part`): frame pixels or audio for remote clients,
  image files for avatar registration. On a ROUTER socket the routing id parts come first.
- Structs are frozen msgspec Structs, tagged by ``type``. Unknown fields are refused.
- Decoding never raises anything but `ProtocolError`, which carries the error reply to
  send: a code, the offending field and the rule it broke. Nothing is ever unpickled.

Message families: client <-> supervisor (requests carry ``req_id``; every reply echoes
it, so a late reply can never be mistaken for the answer to another request), and
supervisor <-> worker (``W*`` for worker -> supervisor, ``Run*``/``Cancel``/``Shutdown`` the
other way).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import msgspec
from msgspec import Meta, Struct

if TYPE_CHECKING:
    from .ring import SlotRef

# 2: `accepted` announces the job's media format (fps, width, height, audio_rate); a
# version 1 client refuses those unknown fields, so it is told `bad_version` up front.
PROTOCOL_VERSION = 2
MAX_CONTROL_BYTES = 1 << 20  # part 0 of any message
MAX_INLINE_BYTES = 256 << 20  # any further part
MAX_TEXT_CHARS = 100_000  # protocol-level cap; engines apply their own, smaller ones
MAX_PARTS = 8

NonNegInt = Annotated[int, Meta(ge=0)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # msgspec bounds stop at int64
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
MAX_SECONDS = 1e9  # the largest duration a message carries (PosFloat)
PosFloat = Annotated[float, Meta(ge=0.0, le=MAX_SECONDS)]
Name = Annotated[str, Meta(max_length=256)]
MAX_REFUSED_TEXT_CHARS = 200  # a `speech_refused` event's `text`: enough to find the piece
ShortText = Annotated[str, Meta(max_length=4096)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
# Dimensions are bounded by the bytes they describe (slot size, part size), checked where
# the data is read; this bound only keeps products within int64.
Dim = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Shape = Annotated[list[Dim], Meta(min_length=1, max_length=4)]
DType = Annotated[
    str,
    Meta(pattern=r"^(uint8|int8|uint16|int16|uint32|int32|int64|float16|float32|float64)$"),
]
SampleRate = Annotated[int, Meta(ge=8000, le=192000)]
# A live session's speech segment, named by the client (a TTS utterance, an LLM reply).
SegmentId = Annotated[str, Meta(min_length=1, max_length=256)]

# Error codes carried by `Error.code` and `JobFailed.code`.
E_BAD_MESSAGE = "bad_message"  # malformed: missing/extra field, wrong type, limit broken
E_UNKNOWN_TYPE = "unknown_type"
E_BAD_VERSION = "bad_version"
E_TOO_LARGE = "too_large"
E_BAD_INPUT = "bad_input"  # well-formed but refused by an engine (no face, bad audio...)
E_NOT_FOUND = "not_found"
E_NO_SESSION = "no_session"  # say hello (again): the session was never opened or expired
E_BUSY = "busy"
E_NO_SPACE = "no_space"  # /dev/shm cannot hold a ring or portrait this request needs
E_DRAINING = "draining"
E_UNAVAILABLE = "unavailable"  # every worker failed for good: no job can ever run
E_STALE = "stale_slot"
E_TIMEOUT = "timeout"
E_CANCELLED = "cancelled"
E_WORKER = "worker_error"
E_INTERNAL = "internal"


class Msg(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """Base of all messages; ``v`` is checked before anything else is decoded."""

    v: int
    kind: ClassVar[str] = ""


# ---------------------------------------------------------------- payload locations


class SlotDesc(Struct, frozen=True, forbid_unknown_fields=True, tag_field="at", tag="shm"):
    """Data in a shared-memory ring slot (local clients and workers): the wire form of
    `avatard.ipc.ring.SlotRef`. `from_ref()` and `ref()` convert without loss (the
    timestamp travels in the message that carries the descriptor, not in it)."""

    ring: Name
    slot: U32
    seq: U64
    shape: Shape
    dtype: DType

    @classmethod
    def from_ref(cls, ref: SlotRef) -> SlotDesc:
        return cls(ring=ref.ring, slot=ref.slot, seq=ref.seq, shape=list(ref.shape),
                   dtype=ref.dtype)

    def ref(self) -> SlotRef:
        """The ring's own descriptor, to read or release the slot with."""
        from .ring import SlotRef

        return SlotRef(self.ring, self.slot, self.seq, tuple(self.shape), self.dtype)

    @property
    def key(self) -> tuple[str, int, int]:
        """(ring, slot, seq): what identifies the slot's current content."""
        return (self.ring, self.slot, self.seq)


class Inline(Struct, frozen=True, forbid_unknown_fields=True, tag_field="at", tag="inline"):
    """Data in message part `part` (remote clients; images to register)."""

    part: Annotated[int, Meta(ge=1, le=MAX_PARTS - 1)]
    shape: Shape
    dtype: DType


Payload = SlotDesc | Inline


# ---------------------------------------------------------------- client -> supervisor


class Hello(Msg, tag="hello"):
    req_id: U64
    client: Name = ""
    inline: bool = False  # True: send frame bytes as message parts (remote clients)


class Health(Msg, tag="health"):
    req_id: U64


class Stats(Msg, tag="stats"):
    req_id: U64


class Voices(Msg, tag="voices"):
    """Which voices `speak` takes: answered with `VoicesReply` from the workers' READY
    reports, without running a job (no `hello` needed)."""

    req_id: U64


class RegisterAvatar(Msg, tag="register_avatar"):
    """An encoded image file (PNG/JPEG...) as uint8 bytes."""

    req_id: U64
    image: Payload


class Speak(Msg, tag="speak"):
    """`start_index` / `audio_start_index`: the first frame / audio chunk index to send
    (0: all). The ones below are made but not sent: a retry of a job whose client already
    holds them (engines are deterministic per seed and index, so a start above 0 needs a
    `seed` other than 0; the daemon refuses it otherwise)."""

    req_id: U64
    text: Text
    voice: Name = ""
    avatar_id: Name = ""  # "" = the engine's default portrait
    seed: Seed = 0
    deadline_s: PosFloat = 0.0  # 0 = the daemon's job_deadline_s
    send_audio: bool = True
    start_index: NonNegInt = 0
    audio_start_index: NonNegInt = 0


class Lipsync(Msg, tag="lipsync"):
    """Audio as float32 mono PCM at `sample_rate`. With `more` the audio is the first
    chunk of a streamed input: the rest follows in `job_audio` requests, the last one
    `final` (audio longer than one payload, see `Welcome.max_payload_bytes`).
    `total_samples` (0: unknown) lets the daemon refuse an input over its limit at once.
    `start_index` as for `Speak`."""

    req_id: U64
    audio: Payload
    sample_rate: SampleRate
    avatar_id: Name = ""
    seed: Seed = 0
    deadline_s: PosFloat = 0.0
    more: bool = False
    total_samples: NonNegInt = 0
    start_index: NonNegInt = 0


class Transcribe(Msg, tag="transcribe"):
    """As `Lipsync`'s audio (`more` and `total_samples` too)."""

    req_id: U64
    audio: Payload
    sample_rate: SampleRate
    deadline_s: PosFloat = 0.0
    more: bool = False
    total_samples: NonNegInt = 0


class JobAudio(Msg, tag="job_audio"):
    """The next chunk (float32 mono PCM, the job's `sample_rate`) of a job accepted with
    `more`; `final` on the last. No reply when taken; a chunk the job cannot take (bad
    payload, over `daemon.max_media_s`, the daemon's streamed-input memory full) ends the
    job with `job_failed`; a job that is not this client's, or takes no more input, gets
    an `error`."""

    req_id: U64
    job_id: Name
    audio: Payload
    final: bool = False


class LiveOptions(Struct, frozen=True, forbid_unknown_fields=True):
    """A live session's own settings (`live_open` `options`; every field optional).

    `prebuffer_ms`: an audio segment starts playing once this much of its speech is
    queued, or its input has ended: a jitter buffer for audio sent at exactly realtime (a
    microphone), whose chunks would otherwise arrive a little after they were due and
    play as short silences. Adds its length to the latency. 0 (default): play at once.
    `render_ahead_frames`: frames rendered ahead of the clock beyond the engine's
    look-ahead (slack for compute time); -1 (default): `daemon.live_render_ahead_frames`
    (itself -1 by default: 0, or half a burst + 1 for an engine that makes frames in
    bursts)."""

    prebuffer_ms: Annotated[int, Meta(ge=0, le=5000)] = 0
    render_ahead_frames: Annotated[int, Meta(ge=-1, le=250)] = -1


class LiveOpen(Msg, tag="live_open"):
    """Open a live session: continuous frames at the engine's fps from now until
    `live_close` (or `bye`, or the client vanishing), idle motion while no speech is
    queued. Answered `accepted` {job_id}; then events (docs/protocol.md, Live sessions)."""

    req_id: U64
    avatar_id: Name = ""  # "" = the engine's default portrait
    voice: Name = ""  # for `live_text`; "" = the TTS engine's first voice
    seed: Seed = 0
    options: LiveOptions = LiveOptions()


class LiveAudio(Msg, tag="live_audio"):
    """Speech of segment `segment_id` of live session `job_id`: float32 mono PCM at
    `sample_rate` (any chunk size; every chunk of a segment at the same rate). Appended
    to the segment; segments play in the order they began. No reply when taken; refused
    input gets an `error` naming the field and the session keeps running."""

    req_id: U64
    job_id: Name
    segment_id: SegmentId
    audio: Payload
    sample_rate: SampleRate


class LiveText(Msg, tag="live_text"):
    """Text of segment `segment_id` as it is written (LLM tokens): the worker's TTS speaks
    each sentence as soon as it is complete, the rest at `final` (or `live_end`)."""

    req_id: U64
    job_id: Name
    segment_id: SegmentId
    text: Text
    final: bool = False


class LiveEnd(Msg, tag="live_end"):
    """No more input for segment `segment_id`: it plays out what it has, then
    `playback_finished` {interrupted: false}."""

    req_id: U64
    job_id: Name
    segment_id: SegmentId


class LiveInterrupt(Msg, tag="live_interrupt"):
    """Barge-in: drop every queued piece of speech of the session (audio, sentences not
    yet spoken); the avatar goes back to idle and the session keeps running."""

    req_id: U64
    job_id: Name


class LiveClose(Msg, tag="live_close"):
    """End the live session: it stops at its next frame and sends `done`."""

    req_id: U64
    job_id: Name


class Cancel(Msg, tag="cancel"):
    req_id: U64
    job_id: Name


class Release(Msg, tag="release"):
    """The client is done with a slot it was handed in a Frame/AudioChunk."""

    req_id: U64
    ring: Name
    slot: U32
    seq: U64


class Bye(Msg, tag="bye"):
    req_id: U64


# ---------------------------------------------------------------- engine descriptions
#
# Built by a worker from its engines at READY (`Capabilities`) and passed on to clients
# unchanged (`VoicesReply.voices`), so both ends read one definition.

MAX_VOICES = 1024  # a multi-speaker model lists a few hundred speakers at most
MAX_VOICE_LANGUAGES = 256
LanguageCode = Annotated[str, Meta(max_length=64)]


class VoiceInfo(Struct, frozen=True, forbid_unknown_fields=True):
    """One voice of the TTS engine: `name` is what `speak.voice` takes; `languages` the
    language codes it speaks as the voice declares them ("en_US", "ru", "fr-fr"), against
    whose scripts its text is checked ([]: it declares none; its text is not checked);
    `sample_rate` the Hz of its `audio` events; `default` true for the voice a request
    without `voice` gets (exactly one voice)."""

    name: Name
    languages: Annotated[list[LanguageCode], Meta(max_length=MAX_VOICE_LANGUAGES)]
    sample_rate: SampleRate
    default: bool = False


VoiceList = Annotated[list[VoiceInfo], Meta(max_length=MAX_VOICES)]
# Language code -> voice name: where text the default voice cannot read goes.
VoiceRouting = Annotated[dict[LanguageCode, Name], Meta(max_length=MAX_VOICE_LANGUAGES)]
Fps = Annotated[int, Meta(ge=0, le=1000)]  # frames per second; 0: none, or not known
AudioRate = Annotated[int, Meta(ge=0, le=192000)]  # Hz; 0: no audio, or not known


class FrameSize(Struct, frozen=True, forbid_unknown_fields=True):
    """Pixels of the frames a portrait renders at: frames are uint8 [height, width, 3]."""

    width: Dim
    height: Dim


# ---------------------------------------------------------------- supervisor -> client


class Reply(Msg, forbid_unknown_fields=False):
    """Base of what the daemon sends clients (replies and job events). From version 2 a
    client ignores fields it does not know in these, so the daemon can add fields to
    them without a version bump (requests stay strict: the daemon refuses unknown
    fields)."""


class Welcome(Reply, tag="welcome"):
    req_id: U64
    session: Name
    server: Name
    input_ring: Name = ""  # where a local client writes audio/images; "" for inline
    input_slot_bytes: NonNegInt = 0
    # The largest payload one request may carry (an input slot, or an inline part);
    # longer audio is streamed in chunks of at most this (Lipsync.more).
    max_payload_bytes: NonNegInt = 0
    max_media_s: PosFloat = 0.0  # longest audio input of one job (daemon.max_media_s)
    # The deadline of a job whose request names none (daemon.job_deadline_s): a client
    # waiting for a quiet job's events waits this long while the daemon answers.
    job_deadline_s: PosFloat = 0.0


class Error(Reply, tag="error"):
    req_id: U64  # 0 when the request id itself could not be read
    code: Name
    field: Name = ""
    rule: ShortText = ""


class Accepted(Reply, tag="accepted"):
    """A job request was queued. The media it will produce: `fps` frames per second and
    frames of `width` x `height` pixels (0 for a job without frames, transcribe; 0 x 0 also
    when the portrait's frame size is not known yet), and `audio_rate`, the Hz of its
    `audio` events (0 when it sends none: lipsync, transcribe, speak with send_audio
    false). All 0 when no worker had loaded its engines yet when the job was accepted."""

    req_id: U64
    job_id: Name
    queue_position: NonNegInt
    fps: Fps
    width: Dim
    height: Dim
    audio_rate: AudioRate


class Busy(Reply, tag="busy"):
    req_id: U64
    retry_after_s: PosFloat
    queue_depth: NonNegInt
    reason: ShortText = ""


class Frame(Reply, tag="frame"):
    job_id: Name
    index: NonNegInt
    pts_us: NonNegInt
    data: Payload


class AudioChunk(Reply, tag="audio"):
    job_id: Name
    index: NonNegInt
    pts_us: NonNegInt
    sample_rate: SampleRate
    data: Payload


class WordMsg(Struct, frozen=True, forbid_unknown_fields=True):
    text: ShortText
    start_s: float
    end_s: float
    probability: float = 1.0


class SegmentMsg(Struct, frozen=True, forbid_unknown_fields=True):
    text: Text
    start_s: float
    end_s: float
    words: list[WordMsg] = []


class TranscriptMsg(Reply, tag="transcript"):
    job_id: Name
    language: Name
    duration_s: float
    segments: list[SegmentMsg]


class Done(Reply, tag="done"):
    job_id: Name
    frames: NonNegInt
    audio_samples: NonNegInt = 0
    media_s: float = 0.0
    wall_s: float = 0.0
    first_frame_s: float = 0.0
    attempts: NonNegInt = 1
    # Live sessions only (0 for other jobs): frames not sent because the client's ring
    # was full (it did not read them in time), and frames made later than one frame
    # period after their due time on the session's clock.
    frames_dropped: NonNegInt = 0
    late_frames: NonNegInt = 0
    # Live sessions: frames of the session's clock that no worker made because the worker
    # running the session was lost and it moved (see `SessionMoved`).
    frames_lost: NonNegInt = 0


class SessionMoved(Reply, tag="session_moved"):
    """Live sessions: the worker running the session was lost (`reason`) and another one
    took it over. The next frame is `resume_index`; the `frames_lost` frames before it were
    never made (the clock ran on meanwhile). Queued speech was lost with the worker: every
    segment known so far has ended (its `playback_finished` came, interrupted, if it had
    started); send new speech in a new segment. The avatar goes on from idle."""

    job_id: Name
    resume_index: NonNegInt
    frames_lost: NonNegInt
    reason: str = ""


class PlaybackStarted(Reply, tag="playback_started"):
    """Live sessions: the first frame carrying speech of `segment_id` is sent next."""

    job_id: Name
    segment_id: SegmentId


class PlaybackFinished(Reply, tag="playback_finished"):
    """Live sessions: segment `segment_id` stopped playing after `position_s` seconds of
    its speech went out with frames; `interrupted` when `live_interrupt` or `live_close`
    cut it short. Comes for every segment whose `playback_started` came."""

    job_id: Name
    segment_id: SegmentId
    position_s: PosFloat
    interrupted: bool = False


class JobWarning(Reply, tag="warning"):
    """Part of a job's input was not used as given, and the job goes on: `code` says
    what (`text_dropped`: words in a script the voice cannot read were left out of the
    speech), `field` names the input, `message` says it for people (which words, which
    script, which voice). Sent at most once per job and message, before the frames it
    concerns."""

    job_id: Name
    code: Name
    message: ShortText
    field: Name = ""


W_TEXT_DROPPED = "text_dropped"  # JobWarning.code: words left out of the speech


class SpeechRefused(Reply, tag="speech_refused"):
    """Live sessions: the session's TTS could not speak a piece of segment `segment_id`'s
    text (`text`: the piece, cut to `MAX_REFUSED_TEXT_CHARS`); it adds no speech, the rest
    of the segment plays. `code`, `field` and `rule` as in an `error` (`bad_input`/`text`:
    nothing speakable, a script the voice cannot read)."""

    job_id: Name
    segment_id: SegmentId
    code: Name
    field: Name = ""
    rule: ShortText = ""
    text: ShortText = ""


class PlaybackSkipped(Reply, tag="playback_skipped"):
    """Live sessions: segment `segment_id` ended (its input ended, it had its turn) without
    any speech to play (no audio, nothing speakable, every piece refused: `reason`). No
    `playback_started` or `playback_finished` comes for it: this is its end."""

    job_id: Name
    segment_id: SegmentId
    reason: ShortText = ""


class JobFailed(Reply, tag="job_failed"):
    job_id: Name
    code: Name
    message: ShortText
    attempts: NonNegInt = 1


class AvatarRegistered(Reply, tag="avatar_registered"):
    req_id: U64
    avatar_id: Name


class HealthReply(Reply, tag="health_reply"):
    req_id: U64
    status: Name  # "starting" | "ready" | "degraded" | "draining"
    ready_workers: NonNegInt
    workers: NonNegInt


class StatsReply(Reply, tag="stats_reply"):
    req_id: U64
    body: dict[str, Any]


class VoicesReply(Reply, tag="voices_reply"):
    """`status`: the health word (`HealthReply.status`). `engine`: the TTS engine's name
    ("" before any worker was ready). `voices` and `voices_by_language` come from the
    report of the last worker that became ready (every worker runs the same engines); both
    are empty until one has, which `status` then explains (`starting`: ask again;
    `failed`: no worker could load its engines)."""

    req_id: U64
    status: Name
    engine: Name = ""
    voices: VoiceList = msgspec.field(default_factory=list)
    voices_by_language: VoiceRouting = msgspec.field(default_factory=dict)


# ---------------------------------------------------------------- worker <-> supervisor
#
# Internal: both ends ship in one package and start together, so these carry no
# compatibility fields. A worker is named by its socket identity (`WorkerId` in
# daemon/pool.py: `w<index>.<attempt>`, plus a suffix per thread), never by a field.


class EngineInfo(Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    kind: Name
    device: Name
    memory_bytes: NonNegInt
    warmup_s: float
    notes: ShortText = ""


class WHello(Msg, tag="w_hello"):
    pid: NonNegInt
    device: Name


class WLoading(Msg, tag="w_loading"):
    stage: ShortText
    progress: Annotated[float, Meta(ge=0.0, le=1.0)]


MAX_JOBS_PER_WORKER = 64  # the upper bound of daemon.jobs_per_worker


class Capabilities(Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker's engines offer clients, reported once at READY, so the supervisor
    answers `voices` and fills `accepted` without running a job. `fps`: the avatar
    engine's frame rate (0: no avatar engine); `default_frame`: the frame size of its
    default portrait (None: it has none); `audio_rate`: the Hz of the TTS engine's PCM,
    which `speak` jobs send as `audio` events (0: no TTS engine); `live_audio_rate`: the Hz
    the avatar engine renders from, which live sessions send as `audio` events (0: no
    avatar engine). `tts_engine`: the TTS
    engine's name ("": the worker runs none, and `voices` is empty); `voices` in the
    engine's order, the default first; `voices_by_language`: the engine's routing
    (language -> voice name)."""

    fps: Fps = 0
    default_frame: FrameSize | None = None
    audio_rate: AudioRate = 0
    live_audio_rate: AudioRate = 0
    tts_engine: Name = ""
    voices: VoiceList = msgspec.field(default_factory=list)
    voices_by_language: VoiceRouting = msgspec.field(default_factory=dict)


class WReady(Msg, tag="w_ready"):
    engines: list[EngineInfo]
    memory_bytes: NonNegInt
    load_s: float
    warmup_s: float
    capacity: Annotated[int, Meta(ge=1, le=MAX_JOBS_PER_WORKER)]  # jobs it runs at once
    capabilities: Capabilities


class WLoadFailed(Msg, tag="w_load_failed"):
    reason: ShortText
    out_of_memory: bool = False


class JobProgress(Struct, frozen=True, forbid_unknown_fields=True):
    """One running job of a worker, as its heartbeat reports it."""

    job_id: Name
    progress: NonNegInt = 0  # frames (or samples) produced so far
    waiting: bool = False  # blocked on a full ring (back-pressure), which is not a stall
    queued_s: PosFloat = 0.0  # live sessions: seconds of speech queued, not yet played
    received_s: PosFloat = 0.0  # live sessions: seconds of client audio taken so far
    # Live sessions: frames this worker dropped (the client's rings were full) and sent
    # late so far, so that stats show them while the session runs.
    frames_dropped: NonNegInt = 0
    late_frames: NonNegInt = 0


RunningJobs = Annotated[list[JobProgress], Meta(max_length=MAX_JOBS_PER_WORKER)]


class WHeartbeat(Msg, tag="w_heartbeat"):
    rss_bytes: NonNegInt = 0
    jobs: RunningJobs = msgspec.field(default_factory=list)  # every running job
    avatars_cached: NonNegInt = 0  # engine states in the worker's avatar cache
    avatar_evictions: NonNegInt = 0  # states let go from it since the worker started
    engine_avatars_cached: NonNegInt = 0  # portraits in the avatar engine's own cache
    # The avatar engine's own running totals (engines that keep them, e.g. Ditto's batch
    # counts: how full its GPU batches are), as `AvatarEngine.counters()` gives them.
    engine_counters: Annotated[dict[Name, float], Meta(max_length=64)] = msgspec.field(
        default_factory=dict)


class WFrame(Msg, tag="w_frame"):
    job_id: Name
    index: NonNegInt
    pts_us: NonNegInt
    data: SlotDesc


class WAudio(Msg, tag="w_audio"):
    job_id: Name
    index: NonNegInt
    pts_us: NonNegInt
    sample_rate: SampleRate
    data: SlotDesc


class WTranscript(Msg, tag="w_transcript"):
    job_id: Name
    language: Name
    duration_s: float
    segments: list[SegmentMsg]


class WJobDone(Msg, tag="w_job_done"):
    job_id: Name
    frames: NonNegInt
    audio_samples: NonNegInt = 0
    media_s: float = 0.0
    frame: FrameSize | None = None  # a registration's: the frame size of its portrait
    frames_dropped: NonNegInt = 0  # live sessions, as Done's
    late_frames: NonNegInt = 0


class WPlaybackStarted(Msg, tag="w_playback_started"):
    job_id: Name
    segment_id: SegmentId


class WPlaybackFinished(Msg, tag="w_playback_finished"):
    job_id: Name
    segment_id: SegmentId
    position_s: PosFloat
    interrupted: bool = False


class WJobWarning(Msg, tag="w_job_warning"):
    """A job's `JobWarning`, as its worker noticed it."""

    job_id: Name
    code: Name
    message: ShortText
    field: Name = ""


class WSpeechRefused(Msg, tag="w_speech_refused"):
    job_id: Name
    segment_id: SegmentId
    code: Name
    field: Name = ""
    rule: ShortText = ""
    text: ShortText = ""


class WPlaybackSkipped(Msg, tag="w_playback_skipped"):
    job_id: Name
    segment_id: SegmentId
    reason: ShortText = ""


class WJobFailed(Msg, tag="w_job_failed"):
    """`field`/`rule`: which input broke which rule (code `bad_input`, from an engine's
    `EngineInputError`); empty for faults, whose text is in `message`."""

    job_id: Name
    code: Name
    message: ShortText
    field: Name = ""
    rule: ShortText = ""


# ---------------------------------------------------------------- job specs
#
# One typed spec per job kind, built once when the supervisor accepts the request and
# carried to the worker inside `RunJob` as a tagged union (tag `kind`); both ends dispatch
# on its type. A new kind adds a spec here, its policy in daemon/book.py and its handler
# in daemon/worker.py.


class JobKind(StrEnum):
    SPEAK = "speak"
    LIPSYNC = "lipsync"
    TRANSCRIBE = "transcribe"
    REGISTER = "register"
    LIVE = "live"


class AvatarRef(Struct, frozen=True, forbid_unknown_fields=True):
    """A registered portrait: the one id the supervisor minted for it (content hash of the
    image file) and the segment holding the file's `nbytes` bytes."""

    avatar_id: Name
    segment: Name
    nbytes: NonNegInt


class JobSpec(Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    """Base of the per-kind specs. `job_kind` names the kind; `renders` says whether it
    produces frames (and so needs output rings)."""

    job_kind: ClassVar[JobKind]
    renders: ClassVar[bool] = False


class SpeakSpec(JobSpec, tag=JobKind.SPEAK.value):
    text: Text
    voice: Name = ""
    avatar: AvatarRef | None = None  # None: the engine's default portrait
    send_audio: bool = True
    job_kind: ClassVar[JobKind] = JobKind.SPEAK
    renders: ClassVar[bool] = True


class LipsyncSpec(JobSpec, tag=JobKind.LIPSYNC.value):
    # float32 mono PCM in an input slot; None: streamed, in JobInput messages
    audio: SlotDesc | None
    sample_rate: SampleRate
    avatar: AvatarRef | None = None
    job_kind: ClassVar[JobKind] = JobKind.LIPSYNC
    renders: ClassVar[bool] = True


class TranscribeSpec(JobSpec, tag=JobKind.TRANSCRIBE.value):
    audio: SlotDesc | None  # as LipsyncSpec.audio
    sample_rate: SampleRate
    job_kind: ClassVar[JobKind] = JobKind.TRANSCRIBE


class RegisterSpec(JobSpec, tag=JobKind.REGISTER.value):
    avatar: AvatarRef
    job_kind: ClassVar[JobKind] = JobKind.REGISTER


class LiveSpec(JobSpec, tag=JobKind.LIVE.value):
    """A live session: paced frames until closed, fed by `LiveInput` messages."""

    avatar: AvatarRef | None = None
    voice: Name = ""
    options: LiveOptions = LiveOptions()
    job_kind: ClassVar[JobKind] = JobKind.LIVE
    renders: ClassVar[bool] = True


AnyJobSpec = SpeakSpec | LipsyncSpec | TranscribeSpec | RegisterSpec | LiveSpec


class RunJob(Msg, tag="run_job"):
    """Supervisor -> worker. Frames with index < `resume_from` (audio chunks below
    `audio_resume_from`) were already delivered by an earlier attempt; the worker
    recomputes them (engines are seeded) but does not send them."""

    job_id: Name
    seed: Seed
    attempt: NonNegInt
    spec: AnyJobSpec
    resume_from: NonNegInt = 0
    audio_resume_from: NonNegInt = 0
    # The rings this job's frames and audio go to ("" = the worker's own). Local clients
    # get rings of their own session, so a client maps only its own session's segments.
    frame_ring: Name = ""
    audio_ring: Name = ""


class CancelJob(Msg, tag="cancel_job"):
    job_id: Name


class JobInput(Msg, tag="job_input"):
    """Supervisor -> worker: chunk `index` (0, 1, ...) of a job's streamed input, its
    bytes in part 1 (float32 PCM); `final` on the last. After a requeue the supervisor
    sends every chunk again, from 0, behind the new `run_job`."""

    job_id: Name
    index: NonNegInt
    final: bool = False


class LiveInputKind(StrEnum):
    AUDIO = "audio"  # speech PCM in part 1 (float32 at `sample_rate`)
    TEXT = "text"  # `text` to speak, `final` on the segment's last fragment
    END = "end"  # no more input for `segment_id`
    INTERRUPT = "interrupt"  # barge-in: drop all queued speech
    CLOSE = "close"  # end the session


class LiveInput(Msg, tag="live_input"):
    """Supervisor -> worker: one checked input of a live session, in the order the client
    sent it. The supervisor has refused bad input already (it answers the client)."""

    job_id: Name
    kind: LiveInputKind
    segment_id: Name = ""  # "" for interrupt and close
    sample_rate: NonNegInt = 0  # audio
    text: Text = ""
    final: bool = False


class Shutdown(Msg, tag="shutdown"):
    reason: ShortText = ""


LIVE_INPUTS = (LiveAudio, LiveText, LiveEnd, LiveInterrupt, LiveClose)
CLIENT_REQUESTS = (Hello, Health, Stats, Voices, RegisterAvatar, Speak, Lipsync, Transcribe,
                   JobAudio, Cancel, Release, Bye, LiveOpen, *LIVE_INPUTS)
SERVER_REPLIES = (Welcome, Error, Accepted, Busy, Frame, AudioChunk, TranscriptMsg, Done,
                  JobFailed, AvatarRegistered, HealthReply, StatsReply, VoicesReply,
                  PlaybackStarted, PlaybackFinished, SessionMoved, JobWarning, SpeechRefused,
                  PlaybackSkipped)
WORKER_TO_SUPERVISOR = (WHello, WLoading, WReady, WLoadFailed, WHeartbeat, WFrame, WAudio,
                        WTranscript, WJobDone, WJobFailed, WPlaybackStarted, WPlaybackFinished,
                        WJobWarning, WSpeechRefused, WPlaybackSkipped)
SUPERVISOR_TO_WORKER = (RunJob, CancelJob, JobInput, LiveInput, Shutdown)


def seconds_over(duration_s: float, limit_s: float) -> str:
    """`duration_s` (seconds) written for a message that says it is over `limit_s`: one
    decimal, or as many more as it takes for the number shown to be over the limit too
    (600.05 against 600 is "600.05", never "600.0"). A duration within the limit gets one
    decimal."""
    for decimals in range(1, 10):
        shown = f"{duration_s:.{decimals}f}"
        if duration_s <= limit_s or float(shown) > limit_s:
            return shown
    return repr(duration_s)


class ProtocolError(Exception):
    """A message that cannot be accepted. `reply()` builds the error answer for it."""

    def __init__(self, code: str, field: str, rule: str, req_id: int = 0):
        super().__init__(f"{code}: {field}: {rule}" if field else f"{code}: {rule}")
        self.code = code
        self.field = field
        self.rule = rule
        self.req_id = req_id

    def reply(self) -> Error:
        return Error(v=PROTOCOL_VERSION, req_id=self.req_id, code=self.code,
                     field=self.field[:256], rule=self.rule[:4096])


class _Head(Struct):
    """What is read before the full decode: enough to route an error reply."""

    type: Any = None
    v: Any = None
    req_id: Any = 0


_ENCODER = msgspec.msgpack.Encoder()
_HEAD_DECODER = msgspec.msgpack.Decoder(_Head)
_RAW_MAP_DECODER = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_ANY_DECODER = msgspec.msgpack.Decoder()
_FIELD_AT = re.compile(r"at `\$\.?([^`]*)`")
_FIELD_NAMED = re.compile(r"field `([^`]+)`")


def _find_bad_utf8(raw: bytes, path: str = "") -> str:
    """Path of the first field whose string is not valid UTF-8 (for the error reply)."""
    try:
        items = _RAW_MAP_DECODER.decode(raw)
    except UnicodeDecodeError:
        return path or "(a key)"
    except msgspec.DecodeError:
        try:
            seq = msgspec.msgpack.decode(raw, type=list[msgspec.Raw])
        except (msgspec.DecodeError, UnicodeDecodeError):
            return path
        for i, item in enumerate(seq):
            try:
                _ANY_DECODER.decode(item)
            except UnicodeDecodeError:
                return _find_bad_utf8(bytes(item), f"{path}[{i}]")
        return path
    for key, value in items.items():
        try:
            _ANY_DECODER.decode(value)
        except UnicodeDecodeError:
            return _find_bad_utf8(bytes(value), f"{path}.{key}" if path else key)
    return path


def _too_deep_field(raw: bytes) -> str:
    """The top-level field holding the over-deep value (decoded one level at a time)."""
    try:
        items = _RAW_MAP_DECODER.decode(raw)
    except (RecursionError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return "message"
    for key, value in items.items():
        try:
            _ANY_DECODER.decode(value)
        except RecursionError:
            return key
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    return "message"


class Codec:
    """Encoder/decoder for one direction of one socket (accepts only `allowed` types)."""

    def __init__(self, allowed: tuple[type[Msg], ...]):
        self.allowed = {cls.__struct_config__.tag: cls for cls in allowed}
        self._decoder = msgspec.msgpack.Decoder(_union(allowed))

    def decode(self, parts: list[bytes] | list[memoryview]) -> tuple[Msg, list[Any]]:
        """Validate and decode a multipart message -> (message, extra parts)."""
        if not parts:
            raise ProtocolError(E_BAD_MESSAGE, "message", "has no parts")
        if len(parts) > MAX_PARTS:
            raise ProtocolError(E_TOO_LARGE, "message", f"has {len(parts)} parts; max {MAX_PARTS}")
        control = bytes(parts[0])
        if len(control) > MAX_CONTROL_BYTES:
            raise ProtocolError(E_TOO_LARGE, "message",
                                f"control part is {len(control)} bytes; max {MAX_CONTROL_BYTES}")
        for i, part in enumerate(parts[1:], start=1):
            if len(part) > MAX_INLINE_BYTES:
                raise ProtocolError(E_TOO_LARGE, f"part[{i}]",
                                    f"is {len(part)} bytes; max {MAX_INLINE_BYTES}")
        try:
            return self._decode(control, parts)
        except RecursionError:
            # msgspec recurses per nesting level: a value nested ~1000 deep must cost the
            # sender an error reply, not the receiver its process.
            raise ProtocolError(E_BAD_MESSAGE, _too_deep_field(control),
                                "is nested too deeply") from None

    def _decode(self, control: bytes, parts: list[Any]) -> tuple[Msg, list[Any]]:
        try:
            head = _HEAD_DECODER.decode(control)
        except UnicodeDecodeError:
            raise ProtocolError(E_BAD_MESSAGE, _find_bad_utf8(control),
                                "must be valid UTF-8") from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(E_BAD_MESSAGE, "message", f"is not a msgpack map ({exc})") from None
        req_id = head.req_id
        if isinstance(req_id, bool) or not isinstance(req_id, int) or not 0 <= req_id < 2**63:
            req_id = 0  # unusable as an id: the error reply must still be a valid message
        if head.v != PROTOCOL_VERSION:
            raise ProtocolError(E_BAD_VERSION, "v",
                                f"must be {PROTOCOL_VERSION}, got {head.v!r}", req_id)
        if not isinstance(head.type, str) or head.type not in self.allowed:
            raise ProtocolError(E_UNKNOWN_TYPE, "type",
                                f"must be one of {sorted(self.allowed)}, got {head.type!r}", req_id)
        try:
            msg = self._decoder.decode(control)
        except UnicodeDecodeError:
            raise ProtocolError(E_BAD_MESSAGE, _find_bad_utf8(control), "must be valid UTF-8",
                                req_id) from None
        except msgspec.ValidationError as exc:
            raise ProtocolError(E_BAD_MESSAGE, _field_of(str(exc)), str(exc), req_id) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(E_BAD_MESSAGE, "message", str(exc), req_id) from None
        return msg, list(parts[1:])

    @staticmethod
    def encode(msg: Msg, *extra: bytes | memoryview) -> list[bytes | memoryview]:
        return [_ENCODER.encode(msg), *extra]


def shm_payloads_named(control: bytes | memoryview) -> list[tuple[str, int, int]]:
    """Best effort, for a request the decoder refused: (ring, slot, seq) of each top-level
    `audio` or `image` payload its control part names as a shared-memory slot (`{"at":
    "shm", "ring": str, "slot": int, "seq": int, ...}`), whatever else is wrong with it, so
    the receiver can give back the input slot that the refused request would have held (a
    refused request gives back its slot: four refusals would otherwise fill a client's
    input ring). Never raises; a part that is not a msgpack map names nothing."""
    try:
        body = msgspec.msgpack.decode(control)
    except Exception:  # not msgpack, too deep (RecursionError is an Exception too)
        return []
    if not isinstance(body, dict):
        return []
    named = []
    for name in ("audio", "image"):
        payload = body.get(name)
        if not isinstance(payload, dict) or payload.get("at") != "shm":
            continue
        ring, slot, seq = payload.get("ring"), payload.get("slot"), payload.get("seq")
        if (isinstance(ring, str) and all(isinstance(v, int) and not isinstance(v, bool)
                                          and v >= 0 for v in (slot, seq))):
            named.append((ring, slot, seq))
    return named


def _field_of(error_text: str) -> str:
    match = _FIELD_AT.search(error_text) or _FIELD_NAMED.search(error_text)
    return match.group(1) if match else "message"


def _union(classes: tuple[type[Msg], ...]) -> Any:
    union = classes[0]
    for cls in classes[1:]:
        union = union | cls
    return union


def make(cls: type[Msg], **fields: Any) -> Msg:
    """Build a message with the current protocol version."""
    return cls(v=PROTOCOL_VERSION, **fields)


def payload_nbytes(payload: SlotDesc | Inline) -> int:
    import numpy as np

    count = 1
    for dim in payload.shape:
        count *= dim
    return count * np.dtype(payload.dtype).itemsize


CLIENT_CODEC = Codec(CLIENT_REQUESTS)  # used by the supervisor to read clients
SERVER_CODEC = Codec(SERVER_REPLIES)  # used by clients to read the supervisor
WORKER_CODEC = Codec(WORKER_TO_SUPERVISOR)  # used by the supervisor to read workers
CONTROL_CODEC = Codec(SUPERVISOR_TO_WORKER)  # used by workers to read the supervisor
