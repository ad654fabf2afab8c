"""The node replica: one avatard daemon on one GPU, behind Ray Serve.

Runs inside a Ray Serve replica actor (a Ray worker process on some node of the cluster).
The replica owns its daemon: it starts a normal `avatard serve` as its child
(`PrivateDaemon`, a private work folder with the daemon's config, runtime directory and
ipc:// socket), is that daemon's only client, and stops it with SIGTERM, the daemon's
drain, when Serve shuts the replica down (scale-down, redeploy, `serve shutdown`). If the
replica's process dies instead (its node was lost), the daemon sees its parent pipe end
and drains by itself (`avatard serve --parent-fd`), so no daemon outlives its replica.

What crosses Ray from here is plain data: dicts of ints, strings and bytes (Ray pickles
them between its own processes; the daemon's socket never carries pickles). The frames
are copied out of the daemon's shared memory once, into the bytes of one event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from avatard.daemon.private_daemon import PrivateDaemon, PrivateDaemonError
from avatard.ipc.async_client import AsyncClient
from avatard.ipc.client_core import (
    AudioEvent,
    BusyError,
    ClientError,
    DoneEvent,
    FrameEvent,
    InputRefusedEvent,
    JobFailedError,
    PlaybackFinishedEvent,
    PlaybackStartedEvent,
    SessionMovedEvent,
)

from .config import ClusterConfig

log = logging.getLogger("avatard.cluster.node")

# Daemon answers that another node may not give: the ingress retries those elsewhere.
RETRYABLE_CODES = frozenset(
    # unavailable: every worker of that node's daemon failed for good; another node may
    # load its engines.
    {"busy", "draining", "daemon_gone", "timeout", "worker_error", "no_space", "unavailable"}
)


WORKDIR_PREFIX = "avd-node-"
DAEMON_POLL_S = 0.25  # how often a node looks whether its daemon process exited


def _start_ticks() -> int:
    from avatard.ipc.segments import process_start_ticks

    return process_start_ticks(os.getpid()) or 0


def sweep_stale_workdirs() -> list[str]:
    """Remove the work folders (`avd-node-<pid>-<start ticks>-*` in the temp directory)
    of node replicas that are gone: a replica that died with its node or was killed never
    ran its own clean-up, and its daemon, killed with it, left its config and log there.
    (Its shared-memory segments are swept by the next daemon that starts.) Returns the
    folders removed."""
    from avatard.ipc.segments import process_start_ticks

    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*-*"):
        pid_text, _, rest = folder.name[len(WORKDIR_PREFIX) :].partition("-")
        ticks_text = rest.partition("-")[0]
        if not (pid_text.isdigit() and ticks_text.isdigit()):
            continue  # not named by this code
        if process_start_ticks(int(pid_text)) == int(ticks_text):
            continue  # its replica runs
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


def capacity_of(status: dict[str, Any], slots_per_worker: int) -> dict[str, float]:
    """A node's capacity from its daemon's status body (`avatard status --json`): `slots`
    (ready workers x jobs per worker), `running` and `queued` jobs, `free_slots` (slots -
    running - queued, may be negative), `ready` (1.0 when the daemon serves, else 0.0).
    All floats: Serve's routing stats are a flat map of numbers."""
    daemon = status["daemon"]
    slots = daemon["ready_workers"] * slots_per_worker
    running = status["queue"]["running"]
    queued = status["queue"]["depth"]
    return {
        "slots": float(slots),
        "running": float(running),
        "queued": float(queued),
        "free_slots": float(slots - running - queued),
        "ready": 1.0 if daemon["state"] == "ready" else 0.0,
    }


async def batched(
    events: AsyncIterator[dict[str, Any]], limit: int = 64
) -> AsyncIterator[list[dict[str, Any]]]:
    """`events` in lists of at most `limit`: a list goes out as soon as one event is
    there, with every event that came while the consumer was busy. A reader task fills a
    queue of `limit` events (then waits: back-pressure to the daemon's ring); closing
    this generator cancels the reader and closes `events` (its `finally` runs)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=limit)
    end = object()

    async def read() -> None:
        try:
            async for event in events:
                await queue.put(event)
        except Exception as exc:  # handed to the consumer, raised there
            await queue.put(exc)
        finally:
            await events.aclose()
        await queue.put(end)

    reader = asyncio.create_task(read())
    try:
        while True:
            batch = [await queue.get()]
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            last = batch[-1]
            if last is end or isinstance(last, Exception):
                if len(batch) > 1:
                    yield batch[:-1]
                if isinstance(last, Exception):
                    raise last
                return
            yield batch
    finally:
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            pass


class Node:
    """Serve deployment class of a node (bound with `ray_actor_options={"num_gpus": ...}`
    by `app.build_app`). `config`: the `ClusterConfig`; its `node` tables are the daemon's
    config. Raises `PrivateDaemonError` / `TimeoutError` from `__init__` when the daemon
    does not become ready within `node_ready_timeout_s` (Serve then retries the replica).
    """

    def __init__(self, config: ClusterConfig):
        import ray

        self.config = config
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        try:
            from ray import serve

            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not inside Serve (a unit test): the actor id names it
            self.replica_id = context.get_actor_id() or f"pid-{os.getpid()}"
        self.slots_per_worker = config.node_daemon_config().daemon.jobs_per_worker
        sweep_stale_workdirs()
        # A short path: the daemon's socket must fit AF_UNIX's 107 bytes. The name
        # carries this process's pid and start time, so a later replica on this machine
        # can tell the folder of one that died (`sweep_stale_workdirs`).
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{_start_ticks()}-")
        )
        sections = {name: dict(table) for name, table in config.node.items()}
        sections.setdefault("daemon", {}).setdefault("drain_timeout_s", config.drain_timeout_s)
        # The GPU Ray gave this replica: Ray sets CUDA_VISIBLE_DEVICES for the actor, and
        # the daemon's workers inherit it.
        self.daemon = PrivateDaemon(self.workdir, sections, die_with_caller=True)
        try:
            self.daemon.wait_ready(config.node_ready_timeout_s)
        except BaseException:
            self._stop_daemon()
            raise
        self._client: AsyncClient | None = None
        self._client_lock: asyncio.Lock | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Live sessions running here, by the ingress's session id; with each, the
        # ingress's request id of every input in flight, by the daemon's request id.
        self._live: dict[str, tuple[Any, dict[int, int]]] = {}
        self._live_open_lock: asyncio.Lock | None = None  # one live open at a time
        self._stopped = False
        log.info(
            "node %s replica %s: daemon pid %d ready in %s",
            self.node_id[:12],
            self.replica_id,
            self.daemon.proc.pid,
            self.workdir,
        )

    # ------------------------------------------------------------------ Serve hooks

    async def check_health(self) -> None:
        """Serve's health check: raises RuntimeError when the daemon process has exited
        (Serve then replaces the replica)."""
        if self.daemon.proc.poll() is not None:
            raise RuntimeError(
                f"the node's daemon exited with status {self.daemon.proc.returncode}"
            )

    async def record_routing_stats(self) -> dict[str, float]:
        """Serve's routing stats hook: this node's capacity (`capacity_of`), read by the
        ingress's `CapacityRouter`. Raises `ClientError` when the daemon does not answer
        within `event_timeout_s` (Serve keeps the last stats)."""
        return capacity_of(await self.status(), self.slots_per_worker)

    def __del__(self) -> None:
        # Serve calls __del__ when it stops the replica (scale-down, redeploy, shutdown):
        # drain the daemon (SIGTERM), bounded by drain_timeout_s, then SIGKILL.
        self._stop_daemon()

    def _stop_daemon(self) -> None:
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        daemon = getattr(self, "daemon", None)
        if daemon is not None:
            try:
                daemon.stop(signal.SIGTERM, timeout_s=self.config.drain_timeout_s + 10)
            except TimeoutError:
                log.warning("node daemon pid %d did not drain in time: killed", daemon.proc.pid)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ calls

    async def _connected(self) -> AsyncClient:
        if self._client_lock is None:
            self._client_lock = asyncio.Lock()
        async with self._client_lock:
            if self._client is None:
                client = AsyncClient(
                    self.daemon.endpoint,
                    timeout_s=self.config.event_timeout_s,
                    name=f"cluster-node-{self.replica_id}",
                )
                await client.connect()
                self._client = client
                if self._watcher is None or self._watcher.done():
                    self._watcher = asyncio.create_task(self._watch_daemon())
            return self._client

    async def _watch_daemon(self) -> None:
        """Until the daemon process exits; then every call waiting on it fails at once
        with `daemon_gone` (retryable: the ingress resumes the job on another node)
        instead of waiting `event_timeout_s` for events that will not come."""
        while (status := self.daemon.proc.poll()) is None:
            await asyncio.sleep(DAEMON_POLL_S)
        log.warning("node %s: daemon pid %d exited with status %s", self.node_id[:12],
                    self.daemon.proc.pid, status)
        if self._client is not None:
            self._client.daemon_lost(f"the node's daemon exited with status {status}")

    async def _call_failed(self) -> None:
        """A call found the connection gone: drop the client, the next call reconnects."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def status(self) -> dict[str, Any]:
        """The daemon's status body (`avatard status --json`). Raises `ClientError`."""
        client = await self._connected()
        try:
            return await client.stats()
        except ClientError:
            await self._call_failed()
            raise

    async def info(self, **routing: Any) -> dict[str, Any]:
        """This node for `GET /v1/status`: node and replica ids, daemon pid, capacity and
        the daemon's whole status body (`routing`: for the router). Raises `ClientError`
        when the daemon does not answer."""
        status = await self.status()
        return {
            "node_id": self.node_id,
            "replica_id": self.replica_id,
            "daemon_pid": self.daemon.proc.pid,
            "capacity": capacity_of(status, self.slots_per_worker),
            "daemon": status,
        }

    async def render(
        self, job: dict[str, Any], start_index: int = 0, audio_start_index: int = 0, **routing: Any
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """`render_events` in lists (`batched`): each list holds one event, or every event
        that was waiting when the caller asked for the next, so a caller that falls behind
        costs Ray one object per list rather than one per frame. The lists end with
        `done` or `failed`."""
        async for batch in batched(self.render_events(job, start_index, audio_start_index)):
            yield batch

    async def render_events(
        self, job: dict[str, Any], start_index: int = 0, audio_start_index: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """Run a `speak` or `lipsync` job on this node's daemon from frame `start_index`
        and audio chunk `audio_start_index` on (docs/protocol.md, "Resuming a job").

        `job`: ``{"kind": "speak", "text", "voice", "avatar_id", "seed", "deadline_s",
        "send_audio"}`` or ``{"kind": "lipsync", "pcm": bytes (float32 mono), "sample_rate",
        "avatar_id", "seed", "deadline_s"}``; `seed` must not be 0 (the ingress fixes it so
        a retry on another node makes the same frames).
        Yields event dicts, in order: `accepted` {node_id, replica_id, job_id, fps, width,
        height, audio_rate}; `frame` {index, shape (h, w, 3), data: uint8 bytes};
        `audio` {index, sample_rate, data: float32 bytes}; then `done` {frames, media_s,
        wall_s, first_frame_s, attempts} or `failed` {code, field, message, retryable}.
        Never raises for the daemon's refusals (they are `failed` events); Ray raises in
        the caller when this replica dies."""
        try:
            client = await self._connected()
            if job["kind"] == "speak":
                handle = await client.speak(
                    job["text"],
                    avatar=job.get("avatar_id", ""),
                    voice=job.get("voice", ""),
                    seed=job["seed"],
                    deadline_s=job.get("deadline_s", 0.0),
                    send_audio=job.get("send_audio", True),
                    start_index=start_index,
                    audio_start_index=audio_start_index,
                )
            else:
                pcm = np.frombuffer(job["pcm"], dtype=np.float32)
                handle = await client.lipsync(
                    pcm,
                    job["sample_rate"],
                    avatar=job.get("avatar_id", ""),
                    seed=job["seed"],
                    deadline_s=job.get("deadline_s", 0.0),
                    start_index=start_index,
                )
        except ClientError as exc:
            if exc.code == "daemon_gone":
                await self._call_failed()
            yield self._failed(exc)
            return
        yield {
            "event": "accepted",
            "node_id": self.node_id,
            "replica_id": self.replica_id,
            "job_id": handle.job_id,
            "fps": handle.fps,
            "width": handle.width,
            "height": handle.height,
            "audio_rate": handle.audio_rate,
        }
        try:
            async for event in handle:
                if isinstance(event, FrameEvent):
                    yield {
                        "event": "frame",
                        "index": event.index,
                        "shape": tuple(event.array.shape),
                        "data": event.array.tobytes(),
                    }
                elif isinstance(event, AudioEvent):
                    yield {
                        "event": "audio",
                        "index": event.index,
                        "sample_rate": event.sample_rate,
                        "data": np.ascontiguousarray(event.pcm, np.float32).tobytes(),
                    }
                elif isinstance(event, DoneEvent):
                    yield {
                        "event": "done",
                        "frames": event.frames,
                        "media_s": event.media_s,
                        "wall_s": event.wall_s,
                        "first_frame_s": event.first_frame_s,
                        "attempts": event.attempts,
                    }
        except ClientError as exc:
            if exc.code == "daemon_gone":
                await self._call_failed()
            yield self._failed(exc)
        finally:
            # The caller stopped reading (its request was cancelled, or it moved on):
            # the daemon must not go on rendering for nobody.
            if not handle.ended_by_daemon() and self.daemon.proc.poll() is None:
                try:
                    await client.cancel(handle.job_id)
                except ClientError:
                    pass
            await handle.aclose()

    async def transcribe(
        self, pcm: bytes, sample_rate: int, deadline_s: float = 0.0, **routing: Any
    ) -> dict[str, Any]:
        """The transcript of float32 mono `pcm` at `sample_rate` Hz: ``{"node_id",
        "language", "duration_s", "segments": [{text, start_s, end_s, words: [...]}]}``,
        or ``{"failed": {code, field, message, retryable}}`` when the daemon refused it.
        `routing` keywords are for the router only."""
        try:
            client = await self._connected()
            result = await client.transcribe(
                np.frombuffer(pcm, dtype=np.float32), sample_rate, deadline_s=deadline_s
            )
        except ClientError as exc:
            if exc.code == "daemon_gone":
                await self._call_failed()
            return {"failed": self._failed(exc)}
        return {
            "node_id": self.node_id,
            "language": result.language,
            "duration_s": result.duration_s,
            "segments": [
                {
                    "text": s.text,
                    "start_s": s.start_s,
                    "end_s": s.end_s,
                    "words": [
                        {
                            "text": w.text,
                            "start_s": w.start_s,
                            "end_s": w.end_s,
                            "probability": w.probability,
                        }
                        for w in s.words
                    ],
                }
                for s in result.segments
            ],
        }

    # ------------------------------------------------------------------ live sessions

    async def live(
        self, session_id: str, options: dict[str, Any], **routing: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Run a live session on this node's daemon for as long as the caller reads
        (docs/protocol.md, "Live sessions"); its inputs come by `live_input` with the same
        `session_id` (the ingress's id, unique in the cluster), sent to this replica.

        `options`: ``{"avatar_id", "voice", "seed", "prebuffer_ms", "render_ahead_frames"}``.
        Yields event dicts: `accepted` {node_id, replica_id, job_id, fps, width, height,
        audio_rate}; then, per frame period, `playback_started` {segment_id}, `frame`
        {index, pts_us, shape (h, w, 3), data: uint8 bytes}, `audio` {index, pts_us,
        sample_rate, data: float32 bytes}, `playback_finished` {segment_id, position_s,
        interrupted}; at any time `session_moved` {resume_index, frames_lost, reason}
        (a worker of this daemon was lost) and `input_refused` {req_id: the caller's,
        what, code, field, rule}; last `done` {frames, frames_dropped, late_frames,
        frames_lost, audio_samples, media_s, wall_s, first_frame_s, attempts} or `failed`
        {code, field, message, retryable}. Indices are this daemon's (from 0). When the
        caller stops reading (Ray cancels the generator) the session is closed.

        A session opens only on a free slot: when the daemon's running and queued jobs
        fill its slots (`capacity_of`) the first and only event is `failed` `busy`
        (retryable, with this node's `node_id` and `replica_id`), not a session that
        would wait in the daemon's queue sending nothing. Opens on one node run one at a
        time, so two cannot both take the last slot (a batch job may still take it
        between the check and the open: the session then waits for a slot)."""
        if self._live_open_lock is None:
            self._live_open_lock = asyncio.Lock()
        refusal: dict[str, Any] | None = None
        try:
            client = await self._connected()
            async with self._live_open_lock:
                capacity = capacity_of(await self.status(), self.slots_per_worker)
                if capacity["free_slots"] < 1:
                    refusal = self.live_busy(capacity)
                else:
                    session = await client.live(
                        avatar=options.get("avatar_id", ""),
                        voice=options.get("voice", ""),
                        seed=options.get("seed", 0),
                        prebuffer_ms=options.get("prebuffer_ms", 0),
                        render_ahead_frames=options.get("render_ahead_frames", -1),
                    )
        except ClientError as exc:
            if exc.code == "daemon_gone":
                await self._call_failed()
            yield self._failed(exc)
            return
        if refusal is not None:
            yield refusal
            return
        requests: dict[int, int | None] = {}
        self._live[session_id] = (session, requests)
        try:
            yield {
                "event": "accepted",
                "node_id": self.node_id,
                "replica_id": self.replica_id,
                "job_id": session.job_id,
                "fps": session.fps,
                "width": session.width,
                "height": session.height,
                "audio_rate": session.audio_rate,
            }
            async for event in session:
                yield self._live_event(event, requests)
        except ClientError as exc:
            if exc.code == "daemon_gone":
                await self._call_failed()
            yield self._failed(exc)
        finally:
            self._live.pop(session_id, None)
            # The ingress stopped reading (its client left, or the session moved away
            # from here): close it, so the daemon frees the slot.
            await session.aclose()

    def live_busy(self, capacity: dict[str, float]) -> dict[str, Any]:
        """The `failed` `busy` event of a live session refused for want of a free slot
        (`capacity`: `capacity_of`), naming the limit."""
        return {
            "event": "failed",
            "code": "busy",
            "field": "",
            "message": f"node {self.node_id[:12]} has no free slot for a live session: "
            f"{capacity['slots']:.0f} slots (node.daemon.workers x "
            f"node.daemon.jobs_per_worker = {self.slots_per_worker} per ready worker), "
            f"{capacity['running']:.0f} running, {capacity['queued']:.0f} queued",
            "retryable": True,
            "at": time.time(),
            "node_id": self.node_id,
            "replica_id": self.replica_id,
        }

    @staticmethod
    def _live_event(event: Any, requests: dict[int, int | None]) -> dict[str, Any]:
        if isinstance(event, FrameEvent):
            return {
                "event": "frame",
                "index": event.index,
                "pts_us": event.pts_us,
                "shape": tuple(event.array.shape),
                "data": event.array.tobytes(),  # copied out of the slot it came in
            }
        if isinstance(event, AudioEvent):
            return {
                "event": "audio",
                "index": event.index,
                "pts_us": event.pts_us,
                "sample_rate": event.sample_rate,
                "data": np.ascontiguousarray(event.pcm, np.float32).tobytes(),
            }
        if isinstance(event, PlaybackStartedEvent):
            return {"event": "playback_started", "segment_id": event.segment_id}
        if isinstance(event, PlaybackFinishedEvent):
            return {
                "event": "playback_finished",
                "segment_id": event.segment_id,
                "position_s": event.position_s,
                "interrupted": event.interrupted,
            }
        if isinstance(event, SessionMovedEvent):
            return {
                "event": "session_moved",
                "resume_index": event.resume_index,
                "frames_lost": event.frames_lost,
                "reason": event.reason,
            }
        if isinstance(event, InputRefusedEvent):
            return {
                "event": "input_refused",
                "req_id": requests.pop(event.req_id, None),
                "what": event.what,
                "code": event.code,
                "field": event.field,
                "rule": event.rule,
            }
        assert isinstance(event, DoneEvent), event
        return {
            "event": "done",
            "frames": event.frames,
            "frames_dropped": event.frames_dropped,
            "late_frames": event.late_frames,
            "frames_lost": event.frames_lost,
            "audio_samples": event.audio_samples,
            "media_s": event.media_s,
            "wall_s": event.wall_s,
            "first_frame_s": event.first_frame_s,
            "attempts": event.attempts,
        }

    async def live_input(
        self,
        session_id: str,
        kind: str,
        req_id: int | None,
        fields: dict[str, Any],
        pcm: bytes = b"",
        **routing: Any,
    ) -> dict[str, Any]:
        """Pass one input to live session `session_id` running here. `kind`: `live_audio`
        (`fields` {segment_id, sample_rate}, `pcm` float32 mono bytes), `live_text`
        {segment_id, text, final}, `live_end` {segment_id}, `live_interrupt`,
        `live_close`. `req_id`: the caller's id, given back in the session's
        `input_refused` event if the daemon refuses the input. Returns ``{"ok": True}``
        once the daemon has it, or ``{"failed": {code, field, message, retryable}}``
        (`not_found`/`session_id` when no such session runs here). `routing`: for the
        router (`target_replica`)."""
        entry = self._live.get(session_id)
        if entry is None:
            return {
                "failed": {
                    "event": "failed",
                    "code": "not_found",
                    "field": "session_id",
                    "message": f"no live session {session_id} on replica {self.replica_id}",
                    "retryable": True,
                }
            }
        session, requests = entry
        try:
            if kind == "live_audio":
                audio = np.frombuffer(pcm, dtype=np.float32)
                ours = await session.send_audio(
                    audio, fields["sample_rate"], fields["segment_id"]
                )
            elif kind == "live_text":
                ours = await session.send_text(
                    fields["text"], fields["segment_id"], final=fields.get("final", False)
                )
            elif kind == "live_end":
                ours = await session.end_segment(fields["segment_id"])
            elif kind == "live_interrupt":
                ours = await session.interrupt()
            elif kind == "live_close":
                ours = await session.close()
            else:
                raise ValueError(f"unknown live input kind {kind!r}")
        except ClientError as exc:
            return {"failed": self._failed(exc)}
        requests[ours] = req_id
        return {"ok": True}

    @staticmethod
    def _failed(exc: ClientError) -> dict[str, Any]:
        code = exc.code or ("job_failed" if isinstance(exc, JobFailedError) else "internal")
        field = exc.field
        if not field and isinstance(exc, JobFailedError):
            # A `job_failed` carries no field: its message does, as an engine's refusal
            # says it ("... bad_input: voice: unknown voice ...").
            named = re.search(rf"{re.escape(code)}: ([A-Za-z_][\w.]*): ", str(exc))
            field = named.group(1) if named else ""
        message = str(exc)
        retryable = isinstance(exc, BusyError) or code in RETRYABLE_CODES
        if code == "timeout" and "job deadline of" in message:
            # The request's own deadline passed: another node would only pass it again.
            field, retryable = "deadline_s", False
            message = f"the job's deadline passed (deadline_s; 0: the daemon's): {message}"
        return {
            "event": "failed",
            "code": code,
            "field": field,
            "message": message,
            "retryable": retryable,
            "at": time.time(),
        }


__all__ = [
    "Node",
    "batched",
    "capacity_of",
    "sweep_stale_workdirs",
    "RETRYABLE_CODES",
    "PrivateDaemonError",
]
