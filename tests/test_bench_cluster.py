"""`avatard bench cluster` on a one-node local Ray cluster: the report adds up (every
request counted once, on the one node, the latency parts no larger than the whole). The
speed itself is measured by the command, never asserted (docs/bench.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray", reason="the cluster extra is not installed")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_cluster_reports_consistent_figures(tmp_path):
    out = tmp_path / "cluster.json"
    result = subprocess.run(
        [sys.executable, "-m", "avatard.daemon.cli", "bench", "cluster", "--nodes", "1"]
        + ["--requests", "3", "--latency-requests", "2", "--frame-ms", "5", "--json"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    (run,) = report["runs"]
    assert run["nodes"] == 1 and run["slots"] == 4 and run["concurrency"] == 4
    assert run["requests"] == 3 and run["jobs_per_node"] == [3] and run["retried"] == 0
    assert run["frames"] > 3 * 20  # ~60 frames a request
    assert run["frames_per_s"] == pytest.approx(run["frames"] / run["wall_s"])
    assert report["scaling"] == {"1": 1.0}
    assert run["latency_requests"] == 2
    # The client's time holds the daemon's: what the cluster adds is not negative, and
    # its two first-frame parts are each no more than the client's whole first frame.
    assert run["added_ms_median"] >= 0 and run["added_first_frame_ms_median"] >= 0
    for part in ("proxy_first_frame_ms_median", "ingress_to_node_first_frame_ms_median"):
        assert 0 <= run[part] <= run["client_first_frame_ms_median"]
