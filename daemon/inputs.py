"""Streamed inputs: audio that comes in chunks after its job was accepted.

A client whose audio is larger than one payload (an input slot, or an inline part) sends
the first chunk with the job request (`more`) and the rest in `job_audio` requests. The
supervisor copies every chunk out of the client's slot at once (so the slot goes back and
the client can write the next one), keeps the chunks here until the job ends, and sends
them to the job's worker as `job_input` messages: those it holds when the job is placed,
then each new one as it comes. A job moved to another worker after a crash gets every
chunk again, from the first, which is why they are kept for the job's whole life.

Owned by the supervisor's thread; nothing here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from avatard.ipc import protocol as P

FLOAT32_BYTES = 4


@dataclass
class StreamedInput:
    """The chunks of one job's input so far (float32 PCM bytes, in order)."""

    sample_rate: int
    chunks: list[bytes] = field(default_factory=list)
    final: bool = False
    nbytes: int = 0

    @property
    def samples(self) -> int:
        return self.nbytes // FLOAT32_BYTES


class StreamedInputs:
    """Every job's streamed input, bounded per job by `max_media_s` of audio and for all
    jobs together by `max_bytes` (config `daemon.max_media_s`,
    `daemon.streamed_input_bytes`)."""

    def __init__(self, max_media_s: float, max_bytes: int):
        self.max_media_s = max_media_s
        self.max_bytes = max_bytes
        self.inputs: dict[str, StreamedInput] = {}
        self.held_bytes = 0

    def check_length(self, samples: int, sample_rate: int, req_id: int = 0) -> None:
        """Refuse an input announced as `samples` long: `ProtocolError` bad_input/audio
        when it is over `max_media_s`."""
        if samples > self.max_media_s * sample_rate:
            shown = P.seconds_over(samples / sample_rate, self.max_media_s)
            raise P.ProtocolError(P.E_BAD_INPUT, "audio", f"is {shown} s "
                                  f"long; the limit is {self.max_media_s:g} s "
                                  "(daemon.max_media_s)", req_id)

    def open(self, job_id: str, sample_rate: int, first: bytes, final: bool) -> None:
        """Start the input of a job just accepted with its first chunk. Raises like
        `add` (the caller then refuses the request)."""
        self.inputs[job_id] = StreamedInput(sample_rate)
        try:
            self.add(job_id, first, final)
        except P.ProtocolError:
            self.close(job_id)
            raise

    def takes_more(self, job_id: str) -> bool:
        """Whether the job has a streamed input whose final chunk has not come."""
        held = self.inputs.get(job_id)
        return held is not None and not held.final

    def add(self, job_id: str, chunk: bytes, final: bool) -> int:
        """Keep the next chunk; returns its index. Raises `ProtocolError`: bad_input/audio
        past `max_media_s`, no_space/audio past `max_bytes` held by all jobs."""
        held = self.inputs[job_id]
        self.check_length(held.samples + len(chunk) // FLOAT32_BYTES, held.sample_rate)
        if self.held_bytes + len(chunk) > self.max_bytes:
            raise P.ProtocolError(P.E_NO_SPACE, "audio", f"the daemon holds {self.held_bytes} "
                                  "bytes of streamed audio; its limit is "
                                  f"daemon.streamed_input_bytes = {self.max_bytes}")
        held.chunks.append(chunk)
        held.nbytes += len(chunk)
        held.final = final
        self.held_bytes += len(chunk)
        return len(held.chunks) - 1

    def messages(self, job_id: str, start: int = 0) -> list[tuple[P.JobInput, bytes]]:
        """The `job_input` messages (with their data part) of chunks `start`.. of a job;
        [] for a job without a streamed input."""
        held = self.inputs.get(job_id)
        if held is None:
            return []
        last = len(held.chunks) - 1
        return [(P.make(P.JobInput, job_id=job_id, index=i,
                        final=held.final and i == last), held.chunks[i])
                for i in range(start, len(held.chunks))]

    def close(self, job_id: str) -> None:
        """The job ended: let its chunks go."""
        held = self.inputs.pop(job_id, None)
        if held is not None:
            self.held_bytes -= held.nbytes
