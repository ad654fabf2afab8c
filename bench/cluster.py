"""`avatard bench cluster`: throughput against node count, and what the cluster adds to a
request's latency, on a local Ray cluster (`ray.cluster_utils.Cluster`, loopback only).

For each node count n: a head (Serve's controller, HTTP proxy, ingress; no GPU) and n
nodes with one logical GPU each, every node replica running a daemon with the fake
engine at a fixed cost per frame. Then, through real HTTP (`frames` responses):

1. latency: `latency_requests` requests one after another. Per request, the cluster's
   added latency is what the client saw minus what the node's daemon reported for the
   same job: total (response complete - daemon's wall time) and first frame (first
   `frame` record read - daemon's first-frame time). That is HTTP, the proxy, the
   ingress, Serve's routing, the node replica and the frames' way back.
2. throughput: `requests` x n requests (the same number of rounds per slot for every
   count, so the last round's tail weighs the same), `concurrency_per_node` x n at a
   time; frames/s over the wall time from the first request to the last response.

Runs in the calling process (the Ray driver); every cluster it starts is shut down
before the next, also on error.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

TEXT = "One two three four five six seven eight."  # ~60 frames with the fake TTS


@dataclass(frozen=True)
class ClusterBenchOptions:
    """`nodes`: node counts to measure; `requests`: render requests per node (throughput);
    `latency_requests`: sequential requests per count; `frame_ms`: the fake engine's
    compute per frame (ms, a sleep: it costs no CPU); `workers`, `jobs_per_worker`: each
    node's daemon; `concurrency_per_node`: requests in flight per node (default: the
    node's slots, workers x jobs_per_worker); `timeout_s`: bound of each request."""

    nodes: tuple[int, ...] = (1, 2)
    requests: int = 40
    latency_requests: int = 10
    frame_ms: float = 40.0
    workers: int = 2
    jobs_per_worker: int = 2
    concurrency_per_node: int = 0
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.nodes or min(self.nodes) < 1:
            raise ValueError(f"nodes: counts >= 1, got {self.nodes}")
        if self.requests < 1 or self.latency_requests < 0:
            raise ValueError("requests must be >= 1 and latency_requests >= 0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_request(port: int, seed: int, timeout_s: float) -> dict[str, float]:
    """One `frames` render; returns client and daemon timings (s) and the frame count.
    Raises RuntimeError for an error status or an `error` record."""
    from avatard.cluster.wire import read_records

    body = json.dumps({"text": TEXT, "seed": seed, "format": "frames", "send_audio": False})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    started = time.perf_counter()
    first_frame = 0.0
    try:
        conn.request("POST", "/v1/render", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"render answered {response.status}: {response.read()[:300]!r}")
        last: dict[str, Any] = {}
        for record in read_records(response):
            if record["type"] == "frame" and not first_frame:
                first_frame = time.perf_counter() - started
            last = record
        total = time.perf_counter() - started
    finally:
        conn.close()
    if last.get("type") != "done":
        raise RuntimeError(f"render ended without done: {last}")
    return {
        "total_s": total,
        "first_frame_s": first_frame,
        "daemon_wall_s": last["daemon_wall_s"],
        "daemon_first_frame_s": last["first_frame_s"],
        "ingress_first_frame_s": last["ingress_first_frame_s"],
        "frames": last["frames"],
        "attempts": last["attempts"],
        "node": last["nodes"][-1],
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_nodes(n: int, options: ClusterBenchOptions, log: Any) -> dict[str, Any]:
    """Start a local cluster with `n` GPU nodes, deploy, measure, shut it all down."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from avatard.cluster.app import deploy
    from avatard.cluster.config import load_cluster_config

    temp_dir = tempfile.mkdtemp(prefix="avd-ray-")
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp_dir}
    ray_cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "resources": {"ingress": 10}, **common},
    )
    port = _free_port()
    config = None
    try:
        for _ in range(n):
            ray_cluster.add_node(num_cpus=1, num_gpus=1, **common)
        ray.init(address=ray_cluster.address, logging_level="error", log_to_driver=False)
        config = load_cluster_config(None, {
            "cluster.http_port": port,
            "cluster.min_nodes": n,
            "cluster.max_nodes": n,
            "cluster.ingress_resource": "ingress",
            "cluster.routing_stats_period_s": 0.5,
            "cluster.drain_timeout_s": 10.0,
            "node.daemon.workers": options.workers,
            "node.daemon.jobs_per_worker": options.jobs_per_worker,
            "node.daemon.devices": "cpu",
            "node.engines": {"avatar": "fake", "tts": "fake", "asr": "fake",
                             "options": {"fake": {"frame_ms": options.frame_ms}}},
        })
        log(f"{n} node(s): deploying")
        deploy(config)
        slots = options.workers * options.jobs_per_worker
        concurrency = (options.concurrency_per_node or slots) * n
        # Warm-up: every node's daemon and the proxy's connections.
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda s: _one_request(port, s, options.timeout_s),
                          range(1, concurrency + 1)))
        log(f"{n} node(s): {options.latency_requests} sequential requests")
        latency = [_one_request(port, 1000 + i, options.timeout_s)
                   for i in range(options.latency_requests)]
        total = options.requests * n
        log(f"{n} node(s): {total} requests, {concurrency} at a time")
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            loaded = list(pool.map(lambda s: _one_request(port, s, options.timeout_s),
                                   range(10_000, 10_000 + total)))
        wall = time.perf_counter() - started
    finally:
        try:
            # The app first (each node drains its daemon), then Serve and Ray.
            if ray.is_initialized() and config is not None:
                serve.delete(config.app_name)
            serve.shutdown()
        finally:
            ray.shutdown()
            ray_cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    frames = sum(r["frames"] for r in loaded)
    report: dict[str, Any] = {
        "nodes": n,
        "slots": slots * n,
        "concurrency": concurrency,
        "requests": len(loaded),
        "frames": frames,
        "wall_s": wall,
        "frames_per_s": frames / wall,
        "requests_per_s": len(loaded) / wall,
        "retried": sum(r["attempts"] > 1 for r in loaded),
        # Jobs each node ran (by Ray node id), to see how evenly the router spread them.
        "jobs_per_node": sorted(Counter(r["node"] for r in loaded).values()),
    }
    if latency:
        added_total = [(r["total_s"] - r["daemon_wall_s"]) * 1000 for r in latency]
        added_first = [(r["first_frame_s"] - r["daemon_first_frame_s"]) * 1000
                       for r in latency]
        report.update({
            "latency_requests": len(latency),
            "added_ms_median": statistics.median(added_total),
            "added_ms_p90": _quantile(added_total, 0.9),
            "added_first_frame_ms_median": statistics.median(added_first),
            "added_first_frame_ms_p90": _quantile(added_first, 0.9),
            # Where the first frame's added time goes: HTTP and Serve's proxy (client
            # minus ingress), and Serve's handle, the node replica and the frame's way
            # back to the ingress (ingress minus daemon).
            "proxy_first_frame_ms_median": statistics.median(
                (r["first_frame_s"] - r["ingress_first_frame_s"]) * 1000 for r in latency),
            "ingress_to_node_first_frame_ms_median": statistics.median(
                (r["ingress_first_frame_s"] - r["daemon_first_frame_s"]) * 1000
                for r in latency),
            "client_first_frame_ms_median": statistics.median(
                r["first_frame_s"] * 1000 for r in latency),
            "daemon_first_frame_ms_median": statistics.median(
                r["daemon_first_frame_s"] * 1000 for r in latency),
        })
    return report


def run_cluster_bench(options: ClusterBenchOptions, log: Any) -> dict[str, Any]:
    """Measure every node count in `options.nodes`; returns {"options", "runs": [per
    count], "scaling": frames/s of each count over the first count's}. Sets Ray's
    loopback and usage-stats switches first (Ray reads them when imported)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    runs = [measure_nodes(n, options, log) for n in options.nodes]
    base = runs[0]["frames_per_s"]
    return {
        "options": asdict(options),
        "cpus": os.cpu_count(),
        "runs": runs,
        "scaling": {str(r["nodes"]): r["frames_per_s"] / base for r in runs},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a markdown table plus the two targets' lines."""
    o = report["options"]
    lines = [
        f"fake engine {o['frame_ms']:g} ms/frame (sleep), {o['workers']} workers x "
        f"{o['jobs_per_worker']} jobs per node, {report['cpus']} CPUs",
        "",
        "| nodes | slots | in flight | requests | frames/s | x first | retried "
        "| added ms (median / p90) | added to first frame ms (median / p90) | jobs per node |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        added = first = "-"
        if "added_ms_median" in r:
            added = f"{r['added_ms_median']:.1f} / {r['added_ms_p90']:.1f}"
            first = (f"{r['added_first_frame_ms_median']:.1f} / "
                     f"{r['added_first_frame_ms_p90']:.1f}")
        lines.append(
            f"| {r['nodes']} | {r['slots']} | {r['concurrency']} | {r['requests']} | "
            f"{r['frames_per_s']:.1f} | {report['scaling'][str(r['nodes'])]:.2f} | "
            f"{r['retried']} | {added} | {first} | {r['jobs_per_node']} |")
    for r in report["runs"]:
        if "proxy_first_frame_ms_median" in r:
            lines.append(
                f"{r['nodes']} node(s), first frame, medians: client "
                f"{r['client_first_frame_ms_median']:.1f} ms; daemon "
                f"{r['daemon_first_frame_ms_median']:.1f}; ingress to node and back "
                f"{r['ingress_to_node_first_frame_ms_median']:.1f}; HTTP and proxy "
                f"{r['proxy_first_frame_ms_median']:.1f}")
    return "\n".join(lines)
