"""Run inside a private mount namespace whose /dev/shm is a small tmpfs (see
tests/test_shm_small.py): a real daemon and its clients on that /dev/shm. Prints one JSON
line of findings last; the test asserts on them.

`serve WORKDIR`: defaults inside the tmpfs: several local sessions render at once, large
portraits are registered, sessions are opened until `no_space`, a job whose session rings
do not fit fails `no_space`, the daemon keeps serving and leaves nothing behind.
`crowd WORKDIR`: portraits fill what the daemon's rings leave free; a new local session
and its job still get their rings, because idle portraits are let go to make room.
`refuse WORKDIR`: the daemon's own rings do not fit: `avatard serve` exits non-zero with a
message, leaving no segment.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from avatard.daemon.private_daemon import PrivateDaemon
from avatard.ipc import segments
from avatard.ipc.client import ClientError

MIB = 1 << 20
SECTIONS = {
    "daemon": {"workers": 1, "min_ready": 1, "devices": "cpu"},
    "timeouts": {"load_s": 60.0, "heartbeat_interval_s": 0.2},
    "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
    # Frames of the shipped engines' size, so the frame rings fill as in production.
    "engines.options.fake": {"width": 512, "height": 512},
}


def _speak(daemon: PrivateDaemon, avatar_bytes: bytes, out: dict, key: str) -> None:
    try:
        with daemon.client(name=key) as client:
            avatar = client.register_avatar(avatar_bytes)
            events = list(client.speak("Hello there. How are you?", avatar=avatar, seed=1))
            out[key] = {"frames": sum(type(e).__name__ == "FrameEvent" for e in events),
                        "last": type(events[-1]).__name__}
    except ClientError as exc:
        out[key] = {"error": exc.code, "message": str(exc)}


def serve(workdir: Path) -> dict:
    found: dict = {"shm_size": segments.shm_space()[0]}
    d = PrivateDaemon(workdir, SECTIONS)
    clients = []
    try:
        status = d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 120, "a ready worker")
        found["shm_at_start"] = status["shm"]
        # Several local sessions render at once.
        results: dict = {}
        threads = [threading.Thread(target=_speak, args=(d, f"portrait {i}".encode() * 100,
                                                         results, f"s{i}"))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        found["concurrent"] = results
        # Phone-photo-sized portraits: the store lets the least recently used go.
        with d.client(name="photos") as client:
            found["photos"] = [client.register_avatar(bytes([i]) * (7 * MIB))
                               for i in range(6)]
        found["avatars"] = d.status()["avatars"]
        # More sessions than fit: `no_space`, and the daemon keeps serving.
        for i in range(30):
            try:
                client = d.client(name=f"extra{i}")
            except ClientError as exc:
                found["hello_refused"] = {"code": exc.code, "message": str(exc),
                                          "after": len(clients)}
                break
            clients.append(client)
        for client in clients:
            client.close()
        clients.clear()
        # (the status call's own inline session is the one left)
        d.wait_for(lambda s: s["daemon"]["sessions"] <= 1, 30, "the extra sessions closed")
        # A job whose session rings do not fit: a hello still fits, a ring pair does not.
        size, free = segments.shm_space()
        per_session = found["shm_at_start"]["per_session_bytes"]
        filler = Path(segments.SHM_DIR) / "filler"
        fd = os.open(filler, os.O_RDWR | os.O_CREAT, 0o600)
        found["free_before_filler"] = free
        try:
            os.posix_fallocate(fd, 0, free - (per_session // 2))
        finally:
            os.close(fd)
        try:
            with d.client(name="squeezed") as client:
                try:
                    list(client.speak("Hello.", seed=1))
                    found["squeezed_job"] = "done"
                except ClientError as exc:
                    found["squeezed_job"] = {"code": exc.code, "message": str(exc)}
                filler.unlink()
                events = list(client.speak("Hello again.", seed=1))
                found["after_room"] = type(events[-1]).__name__
        finally:
            filler.unlink(missing_ok=True)
        found["status_after"] = d.status()["daemon"]["state"]
    finally:
        for client in clients:
            client.close()
        found["exit_code"] = d.stop()
        found["left"] = segments.list_segments()
    found["log_tail"] = d.log_text()[-3000:]
    return found


def crowd(workdir: Path) -> dict:
    found: dict = {"shm_size": segments.shm_space()[0]}
    d = PrivateDaemon(workdir, SECTIONS)
    try:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 120, "a ready worker")
        # An inline client (no ring of its own) fills /dev/shm with portraits.
        with d.client(name="photos", inline=True) as client:
            found["photos"] = [client.register_avatar(bytes([i]) * (7 * MIB))
                               for i in range(2)]
        found["free_after_photos"] = segments.shm_space()[1]
        found["per_session_bytes"] = d.status()["shm"]["per_session_bytes"]
        # A local client: its input ring and its job's ring pair need that room.
        try:
            with d.client(name="local") as client:
                events = list(client.speak("Hello there.", seed=1))
                found["local_job"] = type(events[-1]).__name__
        except ClientError as exc:
            found["local_job"] = {"code": exc.code, "message": str(exc)}
        found["avatars"] = d.status()["avatars"]
        # A let-go portrait is named as such, and can be registered again.
        with d.client(name="again", inline=True) as client:
            try:
                list(client.speak("Hi.", avatar=found["photos"][0], seed=1))
                found["evicted_use"] = "served"
            except ClientError as exc:
                found["evicted_use"] = {"code": exc.code, "message": str(exc)}
    finally:
        found["exit_code"] = d.stop()
        found["left"] = segments.list_segments()
    found["log_tail"] = d.log_text()[-3000:]
    return found


def refuse(workdir: Path) -> dict:
    d = PrivateDaemon(workdir, SECTIONS)
    try:
        code = d.proc.wait(timeout=120)
    except Exception:
        code = d.stop()
    return {"exit_code": code, "log_tail": d.log_text()[-3000:],
            "left": segments.list_segments()}


if __name__ == "__main__":
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    result = {"serve": serve, "crowd": crowd, "refuse": refuse}[mode](workdir)
    print(json.dumps(result))
