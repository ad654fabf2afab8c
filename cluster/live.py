"""Live sessions through the cluster: the ingress's end of `/v1/live` (a WebSocket).

Runs in an ingress replica, one `LiveRelay` per WebSocket. A session is sticky: it runs
on one node replica (`Node.live`, a streaming call that lasts as long as the session),
and every input goes to that replica (`Node.live_input` with `target_replica`). Two
tasks per session: the pump (node events -> client) and the reader (client inputs ->
node); only the pump changes where the session runs.

When the node is lost (its stream raises, ends, or sends nothing for
`cluster.live_event_timeout_s`) or ends the session without the client's `live_close`
(its daemon drains), the pump moves the session: it sends `playback_finished`
(interrupted) for every segment that had started, ends every segment known so far (later
input naming one is refused, as the daemon does after a worker move), opens the session
again on another node with the same seed and options, and sends `session_moved`
{resume_index, frames_lost, reason}. The client's frame indices run on the session's
clock across moves: the frame periods that passed while the session moved are
`frames_lost` and never sent. Indices, counters and request ids the client sees are the
ingress's; the node's are mapped here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import msgspec

from . import wire

log = logging.getLogger("avatard.cluster.live")

RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0)


class SessionEnded(Exception):
    """The session is over (closed, failed, or its client left); the relay stops."""


class LiveRelay:
    """One live session between a WebSocket client and a node replica.

    `ingress`: the `Ingress` (its node handle and `ClusterConfig`); `websocket`: the
    accepted Starlette WebSocket; `opening`: the client's checked `wire.LiveOpen` with its
    seed fixed (not 0). `run()` serves the session until it ends and returns; it never
    raises for the client's or a node's failure."""

    def __init__(self, ingress: Any, websocket: Any, opening: wire.LiveOpen):
        self.ingress = ingress
        self.config = ingress.config
        self.ws = websocket
        self.opening = opening
        self.session_id = f"live-{uuid.uuid4().hex[:16]}"
        self.send_lock = asyncio.Lock()
        # Where the session runs now; `placed` is clear while it moves (inputs wait).
        self.stream: Any = None
        self.replica_id = ""
        self.node_id = ""
        self.placed = asyncio.Event()
        self.attempts = 0
        self.nodes: list[str] = []
        self.avoid_nodes: list[str] = []
        self.avoid_replicas: list[str] = []
        self.avoid_actors: list[str] = []
        self.fps = 25
        # The client's clock: client index = node index + offset.
        self.offset = 0
        self.next_index = 0
        self.last_frame_at = time.monotonic()
        # Segments: started (-> client index of their first frame), fed since the last
        # move, and ended by a move (input naming them is refused).
        self.started: dict[str, int] = {}
        self.fed: set[str] = set()
        self.ended: set[str] = set()
        self.close_sent = False
        self.totals = {
            "frames": 0,
            "frames_dropped": 0,
            "late_frames": 0,
            "frames_lost": 0,
            "audio_samples": 0,
        }

    # ------------------------------------------------------------------ sending

    async def send_json(self, kind: str, **fields: Any) -> None:
        async with self.send_lock:
            if fields.get("req_id", 0) is None:
                del fields["req_id"]  # the client's message had none: none to give back
            await self.ws.send_text(msgspec.json.encode({"type": kind, **fields}).decode())

    async def send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ws.send_bytes(data)

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        """Open the session on a node, then pump and read until it ends."""
        try:
            accepted = await self._place(first=True)
        except SessionEnded:
            return
        await self.send_json(
            "accepted",
            session_id=self.session_id,
            seed=self.opening.seed,
            fps=self.fps,
            width=accepted["width"],
            height=accepted["height"],
            audio_rate=accepted["audio_rate"],
            node_id=self.node_id,
        )
        pump = asyncio.create_task(self._pump(), name=f"{self.session_id}-pump")
        reader = asyncio.create_task(self._read(), name=f"{self.session_id}-reader")
        try:
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, reader):
                task.cancel()
            await asyncio.gather(pump, reader, return_exceptions=True)
            if self.stream is not None:
                self.stream.cancel()  # the node's generator closes the daemon's session
        for task in (pump, reader):
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None and not isinstance(error, SessionEnded):
                    log.warning("live session %s: %s", self.session_id, error)

    async def _place(self, first: bool) -> dict[str, Any]:
        """Open the session on the best node not avoided; returns its `accepted` event.
        Raises SessionEnded (after telling the client `failed`) when
        `cluster.max_attempts` opens failed: `busy` when the nodes refused for want of a
        free slot (`Node.live`; each busy node is asked once, then the session is refused
        naming the limit), else `node_lost`."""
        import ray.exceptions

        last = "no attempt"
        last_code = "node_lost"
        busy_replicas: list[str] = []  # refused this placement for want of a slot
        while self.attempts < self.config.max_attempts:
            if self.attempts:
                await asyncio.sleep(
                    RETRY_BACKOFF_S[min(self.attempts, len(RETRY_BACKOFF_S)) - 1]
                )
            self.attempts += 1
            options = {
                "avatar_id": self.opening.avatar_id,
                "voice": self.opening.voice,
                "seed": self.opening.seed,
                "prebuffer_ms": self.opening.prebuffer_ms,
                "render_ahead_frames": self.opening.render_ahead_frames,
            }
            stream = self.ingress.nodes.options(stream=True).live.remote(
                self.session_id,
                options,
                avoid_nodes=tuple(self.avoid_nodes),
                avoid_replicas=tuple(self.avoid_replicas + busy_replicas),
                avoid_actors=tuple(self.avoid_actors),
            )
            try:
                event = await asyncio.wait_for(stream.__anext__(), self.config.event_timeout_s)
            except (ray.exceptions.RayError, TimeoutError, StopAsyncIteration) as exc:
                stream.cancel()
                last_code = "node_lost"
                last = f"no node accepted the session within cluster.event_timeout_s: {exc!r}"
                dead_actor = getattr(exc, "actor_id", None)
                if dead_actor:
                    self.avoid_actors.append(str(dead_actor))
                continue
            except BaseException:
                # Cancelled (the client left while the session opened): a session the
                # node opens anyway must not run on for nobody.
                stream.cancel()
                raise
            if event["event"] == "failed":
                stream.cancel()
                last = f"{event['code']}: {event['message']}"
                last_code = event["code"]
                if event["code"] == "busy":
                    replica = event.get("replica_id", "")
                    if replica in busy_replicas:
                        break  # the router came back to a busy node: none has a slot
                    busy_replicas.append(replica)
                    continue
                if not event["retryable"] or first and event["code"] != "busy":
                    # The request's own fault (an unknown avatar_id...): no node does better.
                    await self.send_json(
                        "failed",
                        code=event["code"],
                        field=event.get("field", ""),
                        message=event["message"][:2000],
                    )
                    raise SessionEnded(last)
                continue
            self.stream = stream
            self.node_id, self.replica_id = event["node_id"], event["replica_id"]
            self.fps = event["fps"] or self.fps
            self.nodes.append(self.node_id)
            self.placed.set()
            return event
        if last_code == "busy":
            message = (
                f"no node has a free slot for a live session ({len(busy_replicas)} "
                "node(s) asked; a node has node.daemon.workers x node.daemon.jobs_per_worker "
                "slots, shared with render jobs; cluster.max_nodes nodes at most): retry "
                f"when a session closes, or add nodes. Last refusal: {last}"
            )
        else:
            last_code = "node_lost"
            message = (
                f"gave up after cluster.max_attempts={self.config.max_attempts} "
                f"attempts: {last}"
            )
        await self.send_json("failed", code=last_code, field="", message=message[:2000])
        raise SessionEnded(last)

    async def _pump(self) -> None:
        import ray.exceptions

        while True:
            try:
                event = await asyncio.wait_for(
                    self.stream.__anext__(), self.config.live_event_timeout_s
                )
            except StopAsyncIteration:
                await self._lost("the node's stream ended without done")
                continue
            except TimeoutError:
                await self._lost(
                    f"no event for cluster.live_event_timeout_s="
                    f"{self.config.live_event_timeout_s} s"
                )
                continue
            except ray.exceptions.RayError as exc:
                dead_actor = getattr(exc, "actor_id", None)
                if dead_actor:
                    self.avoid_actors.append(str(dead_actor))
                await self._lost(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            await self._forward(event)

    async def _forward(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "frame":
            index = event["index"] + self.offset
            self.next_index = index + 1
            self.last_frame_at = time.monotonic()
            self.totals["frames"] += 1
            pts_us = round(index * 1e6 / self.fps)
            await self.send_bytes(
                wire.live_frame_message(index, pts_us, event["shape"], event["data"])
            )
        elif kind == "audio":
            index = event["index"] + self.offset
            pts_us = round(index * 1e6 / self.fps)
            await self.send_bytes(
                wire.live_audio_message(index, pts_us, event["sample_rate"], event["data"])
            )
        elif kind == "playback_started":
            self.started[event["segment_id"]] = self.next_index
            await self.send_json("playback_started", segment_id=event["segment_id"])
        elif kind == "playback_finished":
            self.started.pop(event["segment_id"], None)
            await self.send_json(
                "playback_finished",
                segment_id=event["segment_id"],
                position_s=event["position_s"],
                interrupted=event["interrupted"],
            )
        elif kind == "session_moved":  # between workers of the node's daemon
            self.ended |= self.fed
            self.fed.clear()
            self.totals["frames_lost"] += event["frames_lost"]
            await self.send_json(
                "session_moved",
                resume_index=event["resume_index"] + self.offset,
                frames_lost=event["frames_lost"],
                reason=event["reason"],
            )
        elif kind == "input_refused":
            keys = ("req_id", "what", "code", "field", "rule")
            await self.send_json("input_refused", **{k: event[k] for k in keys})
        elif kind == "done":
            self._count(event)
            if not self.close_sent:
                # The node ended it without being asked: its daemon drains (scale-down,
                # shutdown). The client did not ask to stop: go on elsewhere.
                await self._lost("the node's daemon closed the session (drain)")
                return
            await self._finish_started()
            await self.send_json("done", **self._done_fields())
            raise SessionEnded("closed")
        else:  # failed
            if event["retryable"] and not self.close_sent:
                await self._lost(f"{event['code']}: {event['message'][:200]}")
                return
            await self._finish_started()
            await self.send_json(
                "failed",
                code=event["code"],
                field=event.get("field", ""),
                message=event["message"][:2000],
            )
            raise SessionEnded(event["code"])

    def _count(self, done: dict[str, Any]) -> None:
        # `frames` is counted as frames went out; the rest only the daemon knows.
        for key in ("frames_dropped", "late_frames", "frames_lost", "audio_samples"):
            self.totals[key] += done[key]

    def _done_fields(self) -> dict[str, Any]:
        return {
            **self.totals,
            "media_s": self.next_index / self.fps,
            "attempts": self.attempts,
            "nodes": self.nodes,
        }

    async def _finish_started(self) -> None:
        """`playback_finished` (interrupted) for every segment that started and has not
        finished: the client hears of each started segment's end, whatever happened."""
        for segment_id, first in list(self.started.items()):
            await self.send_json(
                "playback_finished",
                segment_id=segment_id,
                position_s=max(0, self.next_index - first) / self.fps,
                interrupted=True,
            )
        self.started.clear()

    async def _lost(self, reason: str) -> None:
        """The node is gone or left the session: move it (module docstring)."""
        self.placed.clear()
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None
        log.warning("live session %s lost node %s: %s", self.session_id, self.node_id[:12], reason)
        await self._finish_started()
        self.ended |= self.fed
        self.fed.clear()
        if self.close_sent:
            # The client asked to stop: the session ends here rather than moves.
            await self.send_json("done", **self._done_fields())
            raise SessionEnded("closed while its node was lost")
        if self.node_id:
            self.avoid_nodes.append(self.node_id)
        if self.replica_id:
            self.avoid_replicas.append(self.replica_id)
        await self._place(first=False)
        # The session's clock ran on while it moved: the periods passed since the last
        # frame, less the one that frame filled, were never made.
        lost = max(0, round((time.monotonic() - self.last_frame_at) * self.fps) - 1)
        resume = self.next_index + lost
        self.offset = resume  # the new node counts from 0
        self.next_index = resume
        self.last_frame_at = time.monotonic()
        self.totals["frames_lost"] += lost
        await self.send_json(
            "session_moved", resume_index=resume, frames_lost=lost, reason="node_lost"
        )

    # ------------------------------------------------------------------ client input

    async def _read(self) -> None:
        """Client messages -> the node, one at a time and in order. Ends when the client
        disconnects (SessionEnded)."""
        while True:
            message = await self._receive()
            if "bytes" in message and message["bytes"] is not None:
                await self._refuse_message(
                    "message", "a binary message must follow a live_audio message"
                )
                continue
            try:
                request = wire.live_decoder.decode(message.get("text") or "")
            except msgspec.ValidationError as exc:
                await self._refuse_message(
                    wire.field_of(exc), str(exc), wire.req_id_of(message.get("text") or "")
                )
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                await self.send_json("error", code="bad_json", field="message", rule=str(exc))
                continue
            if isinstance(request, wire.LiveOpen):
                await self._refuse_message("type", "the session is already open")
                continue
            pcm = b""
            if isinstance(request, wire.LiveAudio):
                pcm = await self._audio_payload(request)
                if pcm is None:
                    continue
            await self._pass_on(request, pcm)

    async def _receive(self) -> dict[str, Any]:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise SessionEnded("the client disconnected")
        return message

    async def _audio_payload(self, request: wire.LiveAudio) -> bytes | None:
        """The binary message after `live_audio`, checked; None (refused) when it is not."""
        try:
            message = await asyncio.wait_for(self._receive(), self.config.event_timeout_s)
        except TimeoutError:
            await self._refuse_message(
                "audio",
                f"no binary message followed live_audio within cluster.event_timeout_s="
                f"{self.config.event_timeout_s} s",
                request.req_id,
            )
            return None
        data = message.get("bytes")
        if data is None:
            await self._refuse_message(
                "audio", "live_audio must be followed by a binary message", request.req_id
            )
            return None
        if not data or len(data) % 4:
            await self._refuse_message(
                "audio",
                f"float32 PCM: a non-zero multiple of 4 bytes, got {len(data)}",
                request.req_id,
            )
            return None
        return data

    async def _refuse_message(self, field: str, rule: str, req_id: int | None = None) -> None:
        await self.send_json("error", code="bad_message", field=field, rule=rule, req_id=req_id)

    async def _pass_on(self, request: wire.LiveInput, pcm: bytes) -> None:
        import ray.exceptions

        kind = type(request).__struct_config__.tag
        segment_id = getattr(request, "segment_id", "")
        if segment_id in self.ended:
            await self.send_json(
                "input_refused",
                req_id=request.req_id,
                what=kind,
                code="bad_input",
                field="segment_id",
                rule=f"segment {segment_id!r} ended when the session moved; "
                "send new speech in a new segment",
            )
            return
        if isinstance(request, wire.LiveClose):
            self.close_sent = True
        if segment_id:
            self.fed.add(segment_id)
        fields = {
            k: getattr(request, k)
            for k in ("segment_id", "sample_rate", "text", "final")
            if hasattr(request, k)
        }
        try:
            # While the session moves, its input waits for the new node.
            await asyncio.wait_for(self.placed.wait(), self.config.event_timeout_s)
            result = await asyncio.wait_for(
                self.ingress.nodes.live_input.remote(
                    self.session_id,
                    kind,
                    request.req_id,
                    fields,
                    pcm,
                    target_replica=self.replica_id,
                ),
                self.config.event_timeout_s,
            )
        except (ray.exceptions.RayError, TimeoutError) as exc:
            result = {"failed": {"code": "node_lost", "field": "", "message": repr(exc)[:300]}}
        failed = result.get("failed")
        if failed:
            await self.send_json(
                "input_refused",
                req_id=request.req_id,
                what=kind,
                code=failed["code"],
                field=failed.get("field", ""),
                rule=failed["message"][:2000],
            )
