"""`avatard bench recovery` (bench/recovery.py) with several jobs per worker: a SIGKILL of
the busy worker takes every job it runs down at once, and each of them must still deliver
every frame exactly once. Times are measured by the command, never asserted here."""

from __future__ import annotations

import pytest

from avatard.bench.cli import bench_recovery
from avatard.bench.recovery import (
    FAULT_AT_FRAME,
    PARTS,
    RESTART,
    TIMEOUTS,
    fault_during_job,
    format_recovery,
)
from avatard.engines.fake import FAULT_LINE, InjectedFault, injected_faults


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


def _cells(text: str, fault: str) -> list[str]:
    """The cells of the row of `fault` in the printed table."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {fault} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("name", "fault"), [("engine crashes mid-job", "crash_at_frame"),
                                             ("engine hangs mid-job", "hang_at_frame")])
def test_an_engine_fault_row_times_the_replacement_from_the_fault(name, fault) -> None:
    row = fault_during_job(name, {fault: FAULT_AT_FRAME, "fault_workers": [0],
                                  "fault_attempts": [1]}, None)
    assert row["fault_kind"] == "engine", row
    assert row["errors"] == [] and row["jobs_lost"] == 0 and row["frames_lost"] == 0, row
    assert row["attempts"] == 2 and row["victim_jobs"] == 1, row  # the one job it hit moved
    # Measured from the moment the engine struck, as a signal's row is from the signal.
    assert row["replacement_ready_after_fault_s"] is not None, row
    assert row["max_first_frame_s"] is not None and row["max_frame_gap_s"] is not None, row
    text = format_recovery({"timeouts": TIMEOUTS, "restart": RESTART, "during_job": [row]})
    cells = _cells(text, name)
    assert "-" not in cells and len(cells) == 10, cells


def test_cells_without_a_figure_say_why_in_words() -> None:
    base = {"jobs": 1, "victim_jobs": None, "frames": 10, "exactly_once_in_order": True,
            "attempts": 1, "job_s": 1.0, "max_first_frame_s": 0.5, "max_frame_gap_s": 0.2,
            "median_frame_gap_s": 0.1, "replacement_ready_after_fault_s": None,
            "jobs_lost": 0, "frames_lost": 0, "errors": [], "segments_leaked": 0}
    rows = [{**base, "fault": "none (baseline)", "fault_kind": "none"},
            {**base, "fault": "engine crashes", "fault_kind": "engine"},
            {**base, "fault": "no frames", "fault_kind": "signal", "max_first_frame_s": None,
             "max_frame_gap_s": None, "replacement_ready_after_fault_s": 0.4}]
    text = format_recovery({"timeouts": TIMEOUTS, "restart": RESTART, "during_job": rows})
    assert _cells(text, "none (baseline)")[7] == "no fault"
    assert _cells(text, "engine crashes")[7] == "not timed (the fault's moment is unknown)"
    assert _cells(text, "no frames")[3:5] == ["no frame came", "under two frames"]
    assert " - " not in text


def test_the_fake_engines_fault_lines_are_read_back_in_order() -> None:
    text = "".join([
        "worker 0: busy -> stopping\n",
        FAULT_LINE.format(kind="hang", where="at frame 25", worker=0, attempt=1,
                          at=1234.5, more=""),
        FAULT_LINE.format(kind="crash", where="while loading the avatar engine", worker=3,
                          attempt=2, at=1240.25, more=", exit status 70"),
    ])
    assert injected_faults(text) == [InjectedFault("hang", 0, 1, 1234.5),
                                     InjectedFault("crash", 3, 2, 1240.25)]
