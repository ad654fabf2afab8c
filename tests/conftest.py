"""Shared fixtures. Every test is checked for leaked shared-memory segments: a segment
that appeared during the test and whose owner is this process, or is dead, is a leak."""

from __future__ import annotations

import os

import pytest

from avatard.ipc import segments

# Before any test module imports Ray (pytest imports every module at collection, and
# test_bench_cluster.py comes before test_cluster.py): Ray reads these at import. No usage
# stats, and loopback only: with the switch on, Ray turns 127.0.0.1 in an address into
# the host's own IP and ray.init then waits minutes for a GCS it cannot reach.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = set(segments.list_segments())
    yield
    leaked = []
    for name in set(segments.list_segments()) - before:
        parsed = segments.parse_segment_name(name)
        if parsed is None:
            continue
        if parsed[0] == os.getpid() or not segments.owner_alive(name):
            leaked.append(name)
    for name in leaked:  # clean up so one leak does not fail every later test
        segments.unlink_segment(name)
    assert not leaked, f"test leaked shared-memory segments: {leaked}"


def spawn_context():
    import multiprocessing as mp

    return mp.get_context("spawn")
