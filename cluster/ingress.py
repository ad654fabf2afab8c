"""The ingress: the cluster's HTTP API (FastAPI on a Ray Serve deployment).

Runs in the ingress replicas (Ray worker processes, usually on the head node). It holds no
daemon: every job goes to a node replica through a Serve handle whose router ranks nodes
by capacity (`router.CapacityRouter`). The ingress owns each job's delivery: it counts the
frames and audio chunks it passed on, and when the node dies, drains, is busy or stops
answering (`event_timeout_s`), it sends the job again to another node with the same seed
and the next indices (`start_index`, docs/protocol.md "Resuming a job"), so the client gets
every frame exactly once, in order, up to `max_attempts` attempts.

Routes (docs/cluster.md has the fields and examples):
  POST /v1/render       JSON {text, voice, avatar_id, seed, format, send_audio, deadline_s}
  POST /v1/lipsync      audio file body (or raw float32 with ?sample_rate=); ?seed=&format=
  POST /v1/transcribe   audio as for lipsync -> JSON transcript
  GET  /v1/status       every node's capacity and daemon status
  WebSocket /v1/live    a live session, sticky to one node, moved when it is lost (live.py)
Errors are JSON {"error": {code, field, rule}} with a 4xx/5xx status; never a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import wire
from .config import ClusterConfig
from .live import LiveRelay

log = logging.getLogger("avatard.cluster.ingress")

SEED_MAX = 2**63 - 1
RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0)  # before attempt 2, 3, 4, 5+
FLUSH = {"event": "flush"}  # see Ingress.job_events
ROUTES = (
    "POST /v1/render",
    "POST /v1/lipsync",
    "POST /v1/transcribe",
    "GET /v1/status",
    "WebSocket /v1/live",
)


class RenderRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of `POST /v1/render` (checked by msgspec: errors name the field)."""

    text: str
    voice: str = ""
    avatar_id: str = ""
    seed: int = msgspec.field(default=0)
    format: Literal["mp4", "frames"] = "mp4"
    send_audio: bool = True
    deadline_s: float = 0.0


class ApiError(Exception):
    """An error answered as JSON {"error": {code, field, rule}} with HTTP `status`."""

    def __init__(self, status: int, code: str, field: str, rule: str):
        super().__init__(f"{code}: {field}: {rule}")
        self.status, self.code, self.field, self.rule = status, code, field, rule

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": self.code, "field": self.field, "rule": self.rule}},
            status_code=self.status,
        )


@dataclass
class Finished:
    """A response kept for replays of its `Idempotency-Key`."""

    fingerprint: str
    body: bytes
    media_type: str
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class IdempotencyCache:
    """Responses by `Idempotency-Key`, bounded in bytes (`limit_bytes`, least recently
    finished go first) and age (`ttl_s`). A key in flight holds a future that a retry
    awaits instead of rendering again. Per ingress replica (docs/cluster.md)."""

    def __init__(self, limit_bytes: int, ttl_s: float):
        self.limit_bytes, self.ttl_s = limit_bytes, ttl_s
        self.done: OrderedDict[str, Finished] = OrderedDict()
        self.running: dict[str, tuple[str, asyncio.Future[Finished | None]]] = {}
        self.size_bytes = 0

    def lookup(
        self, key: str, fingerprint: str
    ) -> Finished | asyncio.Future[Finished | None] | None:
        """The kept response, the future of a running one, or None (not seen: the caller
        must `begin`). Raises ApiError 422 when the key came with another request."""
        now = time.monotonic()
        while self.done and now - next(iter(self.done.values())).at > self.ttl_s:
            self._drop(next(iter(self.done)))
        kept = self.done.get(key)
        running = self.running.get(key)
        seen = kept.fingerprint if kept else running[0] if running else None
        if seen is not None and seen != fingerprint:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "Idempotency-Key",
                "this key came with a different request; use a new key",
            )
        return kept or (running[1] if running else None)

    def begin(self, key: str, fingerprint: str) -> None:
        self.running[key] = (fingerprint, asyncio.get_running_loop().create_future())

    def end(self, key: str, finished: Finished | None) -> None:
        """`finished`: the response to keep, None when the request failed (a retry with
        the key renders again)."""
        _, future = self.running.pop(key)
        if not future.done():
            future.set_result(finished)
        if finished is None or len(finished.body) > self.limit_bytes:
            return
        self.done[key] = finished
        self.size_bytes += len(finished.body)
        while self.size_bytes > self.limit_bytes:
            self._drop(next(iter(self.done)))

    def _drop(self, key: str) -> None:
        self.size_bytes -= len(self.done.pop(key).body)


def fixed_seed(seed: int) -> int:
    """The request's seed, or a random one (not 0) when it gave 0: a retry on another
    node needs the same seed to make the same frames."""
    return seed or random.randint(1, SEED_MAX)


# The ingress of this process (a Serve replica is one process): the routes find it here.
CURRENT: dict[str, Ingress] = {}


def current_ingress() -> Ingress:
    """The `Ingress` built in this process (KeyError before it was built)."""
    return CURRENT["ingress"]


class Ingress:
    """The ingress deployment's logic; `app.build_app` wraps it with `serve.ingress`.
    `nodes`: a Serve `DeploymentHandle` of the node deployment; `config`: the
    `ClusterConfig` (limits, timeouts, attempts)."""

    def __init__(self, nodes: Any, config: ClusterConfig):
        CURRENT["ingress"] = self
        self.nodes = nodes
        self.config = config
        # The longest text the nodes' daemons take (their TTS engine's limit).
        self.text_limit = config.text_limit()
        self.idempotency = IdempotencyCache(
            config.idempotency_cache_bytes, config.idempotency_ttl_s
        )

    # ------------------------------------------------------------------ jobs

    async def job_events(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The events of one job across nodes, each frame and audio chunk exactly once and
        in order: `accepted` (once, from the first node), `frame`, `audio`, then `done`
        (with `attempts` and `nodes`, the node ids in order) or `failed` {code, field,
        message}; between them `flush` after the last event of each list a node sent
        (what came together may go out together). Retries on another node as the module
        docstring says; never raises for a node's failure."""
        import ray.exceptions

        next_frame = next_audio = attempts = 0
        avoid_nodes: list[str] = []
        avoid_replicas: list[str] = []
        avoid_actors: list[str] = []
        nodes: list[str] = []
        announced = False
        last_failure: dict[str, Any] = {}
        while attempts < self.config.max_attempts:
            if attempts:
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempts, len(RETRY_BACKOFF_S)) - 1])
            attempts += 1
            stream = self.nodes.options(stream=True).render.remote(
                job,
                next_frame,
                next_audio,
                avoid_nodes=tuple(avoid_nodes),
                avoid_replicas=tuple(avoid_replicas),
                avoid_actors=tuple(avoid_actors),
            )
            node_id = replica_id = ""
            try:
                async for event in self._unbatched(stream):
                    kind = event["event"]
                    if kind == "flush":
                        yield event
                    elif kind == "accepted":
                        node_id, replica_id = event["node_id"], event["replica_id"]
                        nodes.append(node_id)
                        if not announced:
                            announced = True
                            yield event
                    elif kind == "frame":
                        if event["index"] == next_frame:
                            next_frame += 1
                            yield event
                    elif kind == "audio":
                        if event["index"] == next_audio:
                            next_audio += 1
                            yield event
                    elif kind == "done":
                        yield {
                            **event,
                            "attempts": attempts,
                            "nodes": nodes,
                            "frames_sent": next_frame,
                        }
                        return
                    else:  # failed
                        last_failure = event
                        if not event["retryable"]:
                            yield {**event, "attempts": attempts, "nodes": nodes}
                            return
                        log.info(
                            "job on node %s refused (%s): trying another node",
                            node_id[:12],
                            event["code"],
                        )
                        break
            except (ray.exceptions.RayError, TimeoutError, ConnectionError) as exc:
                # The node died, became unreachable, or went quiet past event_timeout_s.
                stream.cancel()
                dead_actor = getattr(exc, "actor_id", None)
                log.warning(
                    "node %s lost mid-job at frame %d (%s): resuming elsewhere",
                    node_id[:12] or "?",
                    next_frame,
                    type(exc).__name__,
                )
                last_failure = {
                    "code": "node_lost",
                    "field": "",
                    "message": f"{type(exc).__name__}: {str(exc)[:300]}",
                }
                if not replica_id and dead_actor:
                    # Died before `accepted` said which replica it was: Ray's error
                    # names its actor, which the router can match.
                    avoid_actors.append(str(dead_actor))
            if node_id:
                avoid_nodes.append(node_id)
            if replica_id:
                avoid_replicas.append(replica_id)
        yield {
            "event": "failed",
            "code": last_failure.get("code", "node_lost"),
            "field": last_failure.get("field", ""),
            "message": f"gave up after cluster.max_attempts={self.config.max_attempts} "
            f"attempts: {last_failure.get('message', '')}",
            "attempts": attempts,
            "nodes": nodes,
        }

    async def _unbatched(self, stream: Any) -> AsyncIterator[dict[str, Any]]:
        """The events of a node's `render` stream (lists of events, `Node.render`), one
        by one. Raises TimeoutError when a list takes over `event_timeout_s`, and
        ConnectionError when the stream ends without `done` or `failed`."""
        while True:
            try:
                batch = await asyncio.wait_for(stream.__anext__(), self.config.event_timeout_s)
            except StopAsyncIteration:
                raise ConnectionError("the node's stream ended without done") from None
            for event in batch:
                yield event
            yield FLUSH

    async def render_response(self, job: dict[str, Any], fmt: str, request: Request) -> Response:
        """The HTTP response of a render/lipsync job: the mp4, or the `frames` stream.
        Applies the request's `Idempotency-Key` (a replay returns the kept response)."""
        key = request.headers.get("idempotency-key", "")
        if key:
            if len(key) > 255:
                raise ApiError(400, "bad_header", "Idempotency-Key", "at most 255 characters")
            # The request as sent: the seed it asked for, not the one fixed for it.
            asked = {k: v for k, v in job.items() if k != "seed"}
            fingerprint = hashlib.sha256(
                msgspec.msgpack.encode({**asked, "format": fmt, "path": request.url.path})
            ).hexdigest()
            seen = self.idempotency.lookup(key, fingerprint)
            if isinstance(seen, asyncio.Future):
                try:
                    seen = await asyncio.wait_for(
                        asyncio.shield(seen), self._request_timeout_s(job)
                    )
                except TimeoutError:
                    raise ApiError(
                        409,
                        "in_progress",
                        "Idempotency-Key",
                        "the request with this key is still running",
                    ) from None
                if seen is None:  # it failed: render again under this key
                    return await self.render_response(job, fmt, request)
            if isinstance(seen, Finished):
                return Response(
                    seen.body,
                    media_type=seen.media_type,
                    headers={**seen.headers, "Idempotent-Replayed": "true"},
                )
            self.idempotency.begin(key, fingerprint)
        headers = {"X-Avatard-Seed": str(job["seed"])}
        if fmt == "frames":
            return StreamingResponse(
                self._frames_body(job, key), media_type=wire.MEDIA_TYPE, headers=headers
            )
        finished: Finished | None = None
        try:
            body, more = await self._mp4(job)
            headers.update(more)
            finished = Finished("", body, "video/mp4", headers)
            return Response(body, media_type="video/mp4", headers=headers)
        finally:
            if key:
                if finished is not None:
                    finished.fingerprint = fingerprint
                self.idempotency.end(key, finished)

    def _request_timeout_s(self, job: dict[str, Any]) -> float:
        return (
            self.config.max_attempts * (self.config.event_timeout_s + 2.0)
            + (job.get("deadline_s") or 0.0)
            + 600.0
        )

    async def _frames_body(self, job: dict[str, Any], key: str) -> AsyncIterator[bytes]:
        kept: list[bytes] | None = [] if key else None
        ok = False
        started = time.monotonic()
        first_frame_s = 0.0
        try:
            pending: list[bytes] = []
            async for event in self.job_events(job):
                kind = event["event"]
                if kind == "frame" and not first_frame_s:
                    first_frame_s = time.monotonic() - started
                if kind != "flush":
                    pending.append(self._record(event, job, started, first_frame_s))
                    ok = kind == "done"
                    if kind not in ("done", "failed"):
                        continue
                # Records that came in one list from the node go out as one chunk: one
                # message to Serve's proxy instead of one per frame.
                chunk = b"".join(pending)
                pending.clear()
                if kept is not None:
                    kept.append(chunk)
                if chunk:
                    yield chunk
        finally:
            if key:
                finished = None
                if ok and kept is not None:
                    finished = Finished(
                        "", b"".join(kept), wire.MEDIA_TYPE, {"X-Avatard-Seed": str(job["seed"])}
                    )
                    finished.fingerprint = self.idempotency.running[key][0]
                self.idempotency.end(key, finished)

    @staticmethod
    def _record(
        event: dict[str, Any], job: dict[str, Any], started: float, first_frame_s: float
    ) -> bytes:
        kind = event["event"]
        if kind == "accepted":
            return wire.record(
                "start",
                seed=job["seed"],
                fps=event["fps"],
                width=event["width"],
                height=event["height"],
                audio_rate=event["audio_rate"],
            )
        if kind == "frame":
            return wire.record(
                "frame", index=event["index"], shape=list(event["shape"]), data=event["data"]
            )
        if kind == "audio":
            return wire.record(
                "audio", index=event["index"], sample_rate=event["sample_rate"], data=event["data"]
            )
        if kind == "done":
            return wire.record(
                "done",
                frames=event["frames_sent"],
                attempts=event["attempts"],
                nodes=event["nodes"],
                wall_s=time.monotonic() - started,
                first_frame_s=event["first_frame_s"],
                daemon_wall_s=event["wall_s"],
                ingress_first_frame_s=first_frame_s,
            )
        return wire.record(
            "error", code=event["code"], field=event.get("field", ""), message=event["message"]
        )

    async def _mp4(self, job: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """Run the job and encode it to mp4 as its events arrive (`StreamingMp4`: each
        frame is encoded when it comes and not kept, so the ingress holds at most one
        list of events from a node, not the whole job). Events come in index order
        across retries (`job_events`), so a job resumed on another node goes on in the
        same file: nothing is encoded twice. Returns (the finished mp4's bytes, headers).
        Raises ApiError for a failed job."""
        from avatard.ipc.client_core import AudioEvent, DoneEvent, FrameEvent

        audio = None
        if job["kind"] == "lipsync":
            audio = (np.frombuffer(job["pcm"], np.float32), job["sample_rate"])
        headers: dict[str, str] = {}
        mp4: StreamingMp4 | None = None
        batch: list[Any] = []
        try:
            async for event in self.job_events(job):
                kind = event["event"]
                if kind == "flush":
                    if mp4 is not None and batch:
                        await mp4.feed(batch)
                    batch = []
                elif kind == "accepted":
                    mp4 = StreamingMp4(event["fps"] or 25, audio)
                elif kind == "frame":
                    array = np.frombuffer(event["data"], np.uint8).reshape(event["shape"])
                    batch.append(FrameEvent("", event["index"], 0, array))
                elif kind == "audio":
                    pcm = np.frombuffer(event["data"], np.float32)
                    batch.append(AudioEvent("", event["index"], 0, event["sample_rate"], pcm))
                elif kind == "done":
                    batch.append(
                        DoneEvent(
                            "",
                            event["frames"],
                            event["media_s"],
                            event["wall_s"],
                            event["first_frame_s"],
                            event["attempts"],
                        )
                    )
                    headers = {
                        "X-Avatard-Attempts": str(event["attempts"]),
                        "X-Avatard-Nodes": ",".join(event["nodes"]),
                    }
                    if mp4 is None:
                        raise ApiError(500, "internal", "", "the job was done before accepted")
                    await mp4.feed(batch)
                    return await mp4.finish(), headers
                else:
                    raise job_error(event)
            raise ApiError(500, "internal", "", "the job ended without done or failed")
        finally:
            if mp4 is not None:
                mp4.close()

    # ------------------------------------------------------------------ status

    async def status(self) -> dict[str, Any]:
        """Every node the router knows: its capacity and daemon status (or the error of
        asking it), plus Serve's view of the application."""
        from ray import serve

        app = serve.status().applications.get(self.config.app_name)
        deployments: dict[str, Any] = {}
        running = 0
        if app is not None:
            deployments = {
                name: {
                    "status": str(getattr(d.status, "value", d.status)),
                    "replicas": {
                        str(getattr(k, "value", k)): v for k, v in d.replica_states.items()
                    },
                }
                for name, d in app.deployments.items()
            }
            running = deployments.get("Node", {}).get("replicas", {}).get("RUNNING", 0)
        # Serve gives a handle no list of replicas: ask again with the ones seen ranked
        # last (`avoid_replicas`), so the router picks an unseen one while there is one.
        nodes: dict[str, dict[str, Any]] = {}
        for _ in range(max(1, running) + 1):
            try:
                info = await asyncio.wait_for(
                    self.nodes.info.remote(avoid_replicas=tuple(nodes)), self.config.event_timeout_s
                )
            except Exception as exc:  # one node's failure is part of the status
                log.warning("status: a node did not answer: %s", exc)
                break
            if info["replica_id"] in nodes:
                break
            nodes[info["replica_id"]] = info
            if len(nodes) >= running:
                break
        free = sum(n["capacity"]["free_slots"] for n in nodes.values())
        return {
            "nodes": sorted(nodes.values(), key=lambda n: n["replica_id"]),
            "node_count": len(nodes),
            "free_slots": free,
            "deployments": deployments,
        }


class StreamingMp4:
    """An mp4 that the ingress encodes while its job runs (`daemon.render.JobMp4`, the
    writer of `avatard render`, so both give the same file: H.264 yuv420p + AAC, `fps`
    frames per second, audio padded to the video's length).

    The file is written in a private folder (mode 0700, `tempfile.mkdtemp`) that `close`
    deletes. Every call on the writer runs in one thread of its own, in the order made,
    off the event loop: `close` from a cancelled request waits for no encoding and cannot
    run beside one. `audio`: (mono float32 PCM, rate in Hz) of a lipsync job, or None.
    """

    def __init__(self, fps: int, audio: tuple[np.ndarray, int] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from avatard.daemon.render import JobMp4

        self.folder = Path(tempfile.mkdtemp(prefix="avd-mux-"))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="avd-mux")
        self.writer = JobMp4(self.folder / "out.mp4", fps, audio=audio)
        self._closed = False

    async def feed(self, events: list[Any]) -> None:
        """Encode `events` (FrameEvent, AudioEvent, DoneEvent: `JobMp4.feed`), in order."""
        await asyncio.wrap_future(self._thread.submit(self._feed_all, events))

    def _feed_all(self, events: list[Any]) -> None:
        for event in events:
            self.writer.feed(event)

    async def finish(self) -> bytes:
        """The finished mp4's bytes. Raises ClientError when no frame came."""
        return await asyncio.wrap_future(self._thread.submit(self._finish))

    def _finish(self) -> bytes:
        result = self.writer.finish()
        return result.path.read_bytes()

    def close(self) -> None:
        """Abort the writer if unfinished and delete the folder, after any encoding
        already asked for (in the writer's thread; returns at once). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._thread.submit(self._cleanup)
        self._thread.shutdown(wait=False)

    def _cleanup(self) -> None:
        import shutil

        try:
            self.writer.abort()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def job_error(event: dict[str, Any]) -> ApiError:
    """The HTTP error of a failed job: 400 for the request's own fault (bad input), 503
    when nodes were busy, lost or could not load their engines, 504 for a deadline, 500
    otherwise."""
    code = event["code"]
    status = {
        "bad_input": 400,
        "bad_message": 400,
        "not_found": 404,
        "too_large": 413,
        "busy": 503,
        "node_lost": 503,
        "draining": 503,
        "daemon_gone": 503,
        "unavailable": 503,
        "timeout": 504,
    }.get(code, 500)
    return ApiError(status, code, event.get("field") or "", event["message"][:2000])


# ---------------------------------------------------------------------- request bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 naming `cluster.max_body_bytes` as soon as it passes
    `limit` bytes (announced or read: a chunked body has no length up front)."""
    announced = request.headers.get("content-length")
    rule = f"at most {limit} bytes (cluster.max_body_bytes)"
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise ApiError(413, "too_large", "body", f"{rule}, got {announced}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", "body", f"{rule}, got more")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_render(body: bytes, text_limit: tuple[int, str]) -> RenderRequest:
    """The checked `RenderRequest`; `text_limit`: (characters, where that limit is set),
    `ClusterConfig.text_limit`. Raises ApiError 400 `bad_json` (not JSON, or not UTF-8)
    or 422 `bad_field` naming the field (`text`...) and the rule."""
    try:
        req = msgspec.json.decode(body, type=RenderRequest)
    except msgspec.ValidationError as exc:
        where = wire.field_of(exc)
        where = "body" if where == "message" else where
        raise ApiError(422, "bad_field", where, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "bad_json", "body", f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bytes that are not UTF-8
        raise ApiError(
            400, "bad_json", "body", f"not valid JSON: the body is not UTF-8 ({exc.reason})"
        ) from None
    if not req.text.strip():
        raise ApiError(422, "bad_field", "text", "must not be empty")
    limit, where = text_limit
    if len(req.text) > limit:
        raise ApiError(
            422, "bad_field", "text", f"at most {limit} characters ({where}), got {len(req.text)}"
        )
    if not 0 <= req.seed <= SEED_MAX:
        raise ApiError(422, "bad_field", "seed", f"must be 0..{SEED_MAX}")
    if req.deadline_s < 0:
        raise ApiError(422, "bad_field", "deadline_s", "must be >= 0")
    return req


def parse_audio(body: bytes, query: dict[str, str]) -> tuple[np.ndarray, int]:
    """Mono float32 PCM and its rate from a request body: raw float32 little-endian when
    `sample_rate` is in the query, else an audio file (PyAV decodes it). Raises ApiError
    422 naming the field."""
    if not body:
        raise ApiError(
            422,
            "bad_field",
            "body",
            "must hold audio (an audio file, or raw float32 PCM with ?sample_rate=)",
        )
    if "sample_rate" in query:
        rate = query_int(query, "sample_rate", 0, 8000, 192000)
        if len(body) % 4:
            raise ApiError(
                422,
                "bad_field",
                "body",
                f"raw PCM must be float32: a multiple of 4 bytes, got {len(body)}",
            )
        pcm = np.frombuffer(body, "<f4").astype(np.float32)
        if not np.isfinite(pcm).all() or (pcm.size and float(np.abs(pcm).max()) > 1.0):
            raise ApiError(422, "bad_field", "body", "samples must be finite, in [-1, 1]")
        return pcm, rate
    try:
        from avatard.engines.audio import decode_audio
        from avatard.engines.base import EngineInputError
    except ImportError:
        raise ApiError(
            415,
            "unsupported",
            "body",
            "audio files need PyAV on the ingress "
            "(pip install 'avatard[embedded]'); send raw float32 PCM with "
            "?sample_rate= instead",
        ) from None
    try:
        return decode_audio(body)
    except EngineInputError as exc:
        raise ApiError(422, "bad_field", "body", str(exc)) from None


def query_int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """Query parameter `name` as an int in low..high. Raises ApiError 422 naming it."""
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(422, "bad_field", name, f"must be an integer, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(422, "bad_field", name, f"must be {low}..{high}, got {value}")
    return value


async def live_opening(websocket: WebSocket, config: ClusterConfig) -> wire.LiveOpen | None:
    """The session's first message, checked, with its seed fixed; None after telling the
    client `error` {code, field, rule} (not `live_open`, bad JSON, a field out of range,
    nothing within `cluster.event_timeout_s`)."""

    async def refuse(code: str, field: str, rule: str) -> None:
        await websocket.send_text(
            msgspec.json.encode({"type": "error", "code": code, "field": field, "rule": rule})
            .decode()
        )

    try:
        message = await asyncio.wait_for(websocket.receive(), config.event_timeout_s)
    except TimeoutError:
        await refuse(
            "timeout",
            "live_open",
            f"no live_open within cluster.event_timeout_s={config.event_timeout_s} s",
        )
        return None
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    if text is None:
        await refuse("bad_message", "message", "the first message must be a JSON live_open")
        return None
    try:
        opening = wire.live_decoder.decode(text)
    except msgspec.ValidationError as exc:
        await refuse("bad_message", wire.field_of(exc), str(exc))
        return None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        await refuse("bad_json", "message", f"not valid JSON: {exc}")
        return None
    if not isinstance(opening, wire.LiveOpen):
        await refuse("bad_message", "type", "the first message must be live_open")
        return None
    return msgspec.structs.replace(opening, seed=fixed_seed(opening.seed))


def make_api(get_ingress: Any) -> FastAPI:
    """The FastAPI app. `get_ingress()` returns the running `Ingress` (the Serve replica's
    instance, set once it is built)."""
    api = FastAPI(title="avatard cluster", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return ApiError(
                404,
                "not_found",
                "path",
                f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}",
            ).response()
        if exc.status_code == 405:
            return ApiError(
                405,
                "method_not_allowed",
                "method",
                f"{request.method} is not "
                f"allowed on {request.url.path}; routes: {', '.join(ROUTES)}",
            ).response()
        return ApiError(exc.status_code, "http_error", "", str(exc.detail)).response()

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return ApiError(500, "internal", "", f"{type(exc).__name__}: {str(exc)[:300]}").response()

    @api.post("/v1/render")
    async def render(request: Request) -> Response:
        ingress = get_ingress()
        req = parse_render(
            await read_body(request, ingress.config.max_body_bytes), ingress.text_limit
        )
        job = {
            "kind": "speak",
            "text": req.text,
            "voice": req.voice,
            "avatar_id": req.avatar_id,
            "seed": fixed_seed(req.seed),
            "asked_seed": req.seed,
            "deadline_s": req.deadline_s,
            "send_audio": req.send_audio,
        }
        return await ingress.render_response(job, req.format, request)

    @api.post("/v1/lipsync")
    async def lipsync(request: Request) -> Response:
        ingress = get_ingress()
        query = dict(request.query_params)
        unknown = sorted(set(query) - {"sample_rate", "seed", "format", "avatar_id"})
        if unknown:
            raise ApiError(
                422,
                "bad_field",
                unknown[0],
                "unknown query parameter (known: sample_rate, seed, format, avatar_id)",
            )
        fmt = query.get("format", "mp4")
        if fmt not in ("mp4", "frames"):
            raise ApiError(422, "bad_field", "format", f"must be mp4 or frames, got {fmt!r}")
        pcm, rate = parse_audio(await read_body(request, ingress.config.max_body_bytes), query)
        job = {
            "kind": "lipsync",
            "pcm": pcm.tobytes(),
            "sample_rate": rate,
            "avatar_id": query.get("avatar_id", ""),
            "asked_seed": query_int(query, "seed", 0, 0, SEED_MAX),
        }
        job["seed"] = fixed_seed(job["asked_seed"])
        return await ingress.render_response(job, fmt, request)

    @api.post("/v1/transcribe")
    async def transcribe(request: Request) -> JSONResponse:
        ingress = get_ingress()
        query = dict(request.query_params)
        pcm, rate = parse_audio(await read_body(request, ingress.config.max_body_bytes), query)
        result: dict[str, Any] = {}
        avoid: list[str] = []
        for _ in range(ingress.config.max_attempts):
            try:
                result = await asyncio.wait_for(
                    ingress.nodes.transcribe.remote(pcm.tobytes(), rate, avoid_nodes=tuple(avoid)),
                    ingress.config.event_timeout_s,
                )
            except Exception as exc:  # a node lost: ask another one
                result = {
                    "failed": {
                        "code": "node_lost",
                        "field": "",
                        "retryable": True,
                        "message": f"{type(exc).__name__}: {str(exc)[:300]}",
                    }
                }
            failed = result.get("failed")
            if not failed:
                return JSONResponse(result)
            if not failed["retryable"]:
                break
            avoid.append(result.get("node_id", ""))
        raise job_error(result["failed"])

    @api.get("/v1/status")
    async def status() -> JSONResponse:
        return JSONResponse(await get_ingress().status())

    @api.websocket("/v1/live")
    async def live(websocket: WebSocket) -> None:
        ingress = get_ingress()
        await websocket.accept()
        opening = await live_opening(websocket, ingress.config)
        if opening is not None:
            await LiveRelay(ingress, websocket, opening).run()
        try:
            await websocket.close()
        except RuntimeError:
            pass  # the client closed it already

    return api
