"""Shared fixtures. Every test is checked for leaked shared-memory segments: a segment
that appeared during the test and whose owner is this process, or is dead, is a leak."""

from __future__ import annotations

import os

import pytest

from avatard.ipc import segments


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
