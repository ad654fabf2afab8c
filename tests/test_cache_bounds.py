"""Caches that never shrink (issue 16, item 4): every distinct portrait registered used to
add its engine state to the worker for good and a segment to /dev/shm for good. Now the
daemon's store, the worker's cache and the engine's cache are bounded and least recently
used first; each has a metric. A real daemon with the fake engine, whose avatar states
hold 1 MiB each (`avatar_state_kb`) so a leak shows in the worker's RSS.
"""

from __future__ import annotations

import io
import time
import urllib.request

import numpy as np
import pytest
from daemon_harness import free_port, run_daemon
from PIL import Image

from avatard.ipc.client import ClientError

PORTRAITS = 200
WARM = 20  # after these, segment count and RSS must stay flat
MAX_COUNT = 16
WORKER_CACHE = 4
ENGINE_CACHE = 4
STATE_KB = 1024
# A leak of the worker's avatar cache adds STATE_KB per portrait: 180 MiB over the run.
# Bounded, the worker holds at most WORKER_CACHE + ENGINE_CACHE states (8 MiB) whatever
# the count; what else may grow is the allocator's arenas and job bookkeeping, a few MiB.
RSS_GROWTH_BOUND_BYTES = 24 << 20


def _portrait(i: int) -> bytes:
    """A small distinct PNG (32 x 32, noise seeded by i): about 3 KB."""
    pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _scrape(port: int) -> dict[str, str]:
    """The metrics endpoint's samples by name (with labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    return dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                if line and not line.startswith("#"))


def _figures(status: dict) -> dict:
    worker = status["workers"][0]
    return {"segments": status["shm"]["segments"], "rss": worker["rss_bytes"],
            "avatars": status["avatars"]["count"], "cache": worker["avatar_cache"]}


@pytest.mark.timeout(400)
def test_200_portraits_keep_segments_and_worker_rss_flat(tmp_path):
    port = free_port()
    with run_daemon(tmp_path, fake={"avatar_state_kb": STATE_KB, "cache_size": ENGINE_CACHE},
                    daemon={"metrics_port": port},
                    sections={"avatars": {"max_count": MAX_COUNT,
                                          "worker_cache_size": WORKER_CACHE}}) as d:
        with d.client(name="portraits", timeout_s=30) as client:
            ids = []
            for i in range(PORTRAITS):
                ids.append(client.register_avatar(_portrait(i)))
                if i % 25 == 0:  # render with it too: the engine state is used, not only made
                    events = list(client.speak("Hi.", avatar=ids[-1], seed=1, send_audio=False))
                    assert type(events[-1]).__name__ == "DoneEvent"
                if i == WARM - 1:
                    warm = _figures(d.status())
            assert len(set(ids)) == PORTRAITS
            # The worker's figures come with its heartbeats: wait for one after the last job.
            end_status = d.wait_for(
                lambda s: s["workers"][0]["avatar_cache"]["evictions"]
                >= PORTRAITS - WORKER_CACHE, 20, "a heartbeat after the last registration")
            end = _figures(end_status)
            # Flat: the same segments (the store is full at MAX_COUNT in both readings) ...
            assert warm["avatars"] == MAX_COUNT == end["avatars"], (warm, end)
            assert end["segments"] == warm["segments"], (warm, end)
            assert end_status["avatars"]["evictions"] == PORTRAITS - MAX_COUNT
            # ... and the worker's memory within the stated bound.
            assert end["rss"] - warm["rss"] <= RSS_GROWTH_BOUND_BYTES, (warm, end)
            assert end["cache"]["cached"] <= WORKER_CACHE
            assert end["cache"]["engine_cached"] <= ENGINE_CACHE
            # A job naming a portrait that was let go gets a clear not_found.
            with pytest.raises(ClientError) as caught:
                list(client.speak("Hi.", avatar=ids[0], seed=1))
            assert caught.value.code == "not_found" and "let go" in str(caught.value)
            assert "register it again" in str(caught.value)
            again = client.register_avatar(_portrait(0))  # same bytes, same id, usable
            assert again == ids[0]
            events = list(client.speak("Hi.", avatar=again, seed=1, send_audio=False))
            assert type(events[-1]).__name__ == "DoneEvent"
        # The client's bye closes its session rings on the daemon's next tick: wait until
        # the segment count reads the same in the status before and after a scrape.
        deadline = time.monotonic() + 20
        while True:
            before = d.status()["shm"]["segments"]
            lines = _scrape(port)
            after = d.status()["shm"]["segments"]
            if before == after == float(lines["avatard_shm_segments"]):
                break
            assert time.monotonic() < deadline, ("segment count never settled", before, after,
                                                 lines["avatard_shm_segments"])
            time.sleep(0.2)
        assert float(lines["avatard_avatars"]) == MAX_COUNT
        assert float(lines["avatard_avatar_evictions_total"]) >= PORTRAITS - MAX_COUNT
        assert float(lines['avatard_worker_avatars_cached{cache="worker",worker="0"}']) \
            <= WORKER_CACHE
