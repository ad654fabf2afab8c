"""Prometheus metrics for `avatard serve` (off unless daemon.metrics_port is set).

A custom collector asks the supervisor's loop for a status snapshot at scrape time
(`StatusHandoff`): the loop builds it on its own thread at its next tick, so the numbers
are of one moment, never older than the scrape, and nothing runs between scrapes. The
HTTP server runs in prometheus_client's own threads, which never read the job book, the
pool or the sessions themselves: the loop changes them as it goes. A scrape the loop does
not answer within SNAPSHOT_WAIT_S fails (HTTP 500, so Prometheus marks the target down).
"""

from __future__ import annotations

import logging
from typing import Any

from .status import StatusHandoff

log = logging.getLogger("avatard.metrics")

# How long a scrape waits for the loop's snapshot, in seconds: the loop answers within a
# tick (TICK_S plus the tick's work); well below Prometheus' default scrape_timeout (10 s).
SNAPSHOT_WAIT_S = 5.0

WORKER_STATES = ("waiting", "starting", "loading", "ready", "busy", "stopping", "backoff",
                 "failed")


class _Collector:
    def __init__(self, handoff: StatusHandoff, wait_s: float = SNAPSHOT_WAIT_S):
        self.handoff = handoff
        self.wait_s = wait_s

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.handoff.take(self.wait_s)
        states = GaugeMetricFamily("avatard_workers", "Workers by state", labels=["state"])
        counts = {s: 0 for s in WORKER_STATES}
        for w in status["workers"]:
            counts[w["state"]] = counts.get(w["state"], 0) + 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        restarts = CounterMetricFamily("avatard_worker_restarts", "Worker restarts",
                                       labels=["worker", "device"])
        rss = GaugeMetricFamily("avatard_worker_rss_bytes", "Worker resident memory",
                                labels=["worker", "device"])
        gpu = GaugeMetricFamily("avatard_worker_device_memory_bytes", "Worker GPU memory",
                                labels=["worker", "device"])
        for w in status["workers"]:
            labels = [str(w["id"]), w["device"]]
            restarts.add_metric(labels, w["restarts"])
            rss.add_metric(labels, w["rss_bytes"])
            gpu.add_metric(labels, w["device_memory_bytes"])
        yield restarts
        yield rss
        yield gpu
        yield GaugeMetricFamily("avatard_queue_depth", "Jobs waiting for a worker",
                                value=status["queue"]["depth"])
        jobs = CounterMetricFamily("avatard_jobs", "Jobs by outcome", labels=["outcome"])
        for key in ("jobs_done", "jobs_failed", "jobs_cancelled", "jobs_requeued"):
            jobs.add_metric([key.removeprefix("jobs_")], status["jobs"][key])
        yield jobs
        # Registrations apart: a portrait refused for bad input is not a failed render job.
        registrations = CounterMetricFamily("avatard_avatar_registrations",
                                            "Portrait registrations by outcome",
                                            labels=["outcome"])
        for outcome, count in status["registrations"].items():
            registrations.add_metric([outcome], count)
        yield registrations
        yield CounterMetricFamily("avatard_frames_delivered", "Frames delivered to clients",
                                  value=status["jobs"]["frames_delivered"])
        # Live sessions: frames their clients did not read in time, and frames made later
        # than one frame period on a session's clock (counted when each session ends).
        yield CounterMetricFamily("avatard_live_frames_dropped",
                                  "Live-session frames dropped for clients that did not read",
                                  value=status["jobs"]["live_frames_dropped"])
        yield CounterMetricFamily("avatard_live_late_frames",
                                  "Live-session frames made late on the session's clock",
                                  value=status["jobs"]["live_late_frames"])
        yield from _cache_metrics(status)
        if status["rtf_recent_median"] is not None:
            yield GaugeMetricFamily("avatard_rtf_recent_median",
                                    "Median real-time factor of recent jobs",
                                    value=status["rtf_recent_median"])


def _cache_metrics(status: dict[str, Any]):
    """The bounded caches and /dev/shm: avatar store, worker and engine avatar caches."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    avatars, shm = status["avatars"], status["shm"]
    yield GaugeMetricFamily("avatard_avatars", "Portraits the daemon keeps",
                            value=avatars["count"])
    yield GaugeMetricFamily("avatard_avatar_bytes", "Bytes of portraits the daemon keeps",
                            value=avatars["bytes"])
    yield CounterMetricFamily("avatard_avatar_evictions", "Portraits let go to make room",
                              value=avatars["evictions"])
    cached = GaugeMetricFamily("avatard_worker_avatars_cached",
                               "Avatar states a worker keeps", labels=["worker", "cache"])
    evicted = CounterMetricFamily("avatard_worker_avatar_evictions",
                                  "Avatar states a worker let go", labels=["worker"])
    for w in status["workers"]:
        cache = w["avatar_cache"]
        cached.add_metric([str(w["id"]), "worker"], cache["cached"])
        cached.add_metric([str(w["id"]), "engine"], cache["engine_cached"])
        evicted.add_metric([str(w["id"])], cache["evictions"])
    yield cached
    yield evicted
    yield GaugeMetricFamily("avatard_shm_segments", "Shared-memory segments of the daemon",
                            value=shm["segments"])
    yield GaugeMetricFamily("avatard_shm_free_bytes", "Free bytes of /dev/shm",
                            value=shm["free_bytes"])
    rings = GaugeMetricFamily("avatard_shm_ring_bytes", "Bytes the rings reserve",
                              labels=["owner"])
    rings.add_metric(["daemon"], shm["daemon_rings_bytes"])
    rings.add_metric(["sessions"], shm["session_rings_bytes"])
    yield rings


def start_metrics_server(handoff: StatusHandoff, host: str, port: int) -> None:
    """Serve /metrics on `host`:`port` from snapshots the supervisor loop hands over
    through `handoff`. Raises RuntimeError when prometheus_client is not installed, and
    OSError when the port cannot be bound."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import CollectorRegistry
    except ImportError as exc:
        raise RuntimeError("daemon.metrics_port is set but prometheus_client is not "
                           "installed: pip install 'avatard[metrics]'") from exc
    registry = CollectorRegistry()
    registry.register(_Collector(handoff))
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)
