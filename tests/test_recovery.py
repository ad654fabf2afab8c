"""`avatard bench recovery` (bench/recovery.py) with several jobs per worker: a SIGKILL of
the busy worker takes every job it runs down at once, and each of them must still deliver
every frame exactly once. Times are measured by the command, never asserted here."""

from __future__ import annotations

import pytest

from avatard.bench.cli import bench_recovery
from avatard.bench.recovery import (
    PARTS,
    RESTART,
    TIMEOUTS,
    fault_during_job,
    format_recovery,
)


def test_the_command_offers_every_part() -> None:
    option = next(p for p in bench_recovery.params if p.name == "parts")
    assert tuple(option.type.choices) == PARTS


@pytest.mark.timeout(240)
def test_sigkill_of_a_worker_running_three_jobs_loses_nothing() -> None:
    row = fault_during_job("SIGKILL of the busy worker", {}, "SIGKILL", jobs_per_worker=3)
    # 5 jobs on 2 workers of 3 places: the busiest worker runs 3 when the signal goes out.
    assert row["jobs"] == 5, row
    assert row["victim_jobs"] == 3, row
    assert row["errors"] == [], row
    assert row["jobs_lost"] == 0, row
    assert row["frames_lost"] == 0, row
    assert row["exactly_once_in_order"], row
    assert row["attempts"] == 2, row  # the victim's jobs moved once
    assert row["replacement_ready_after_fault_s"] is not None, row
    assert row["segments_leaked"] == 0, row
    text = format_recovery({"timeouts": TIMEOUTS, "restart": RESTART, "jobs_per_worker": 3,
                            "during_job": [row]})
    assert "2 workers x 3 jobs, 5 jobs" in text
    assert "segments left in /dev/shm after SIGTERM: 0 (1 daemons)" in text
