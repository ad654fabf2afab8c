"""An avatar engine's running totals reach `avatard stats` through worker heartbeats."""

from __future__ import annotations

import pytest
from daemon_harness import run_daemon


@pytest.mark.timeout(120)
def test_engine_counters_arrive_in_stats(tmp_path):
    with run_daemon(tmp_path) as d:
        with d.client(name="counters", timeout_s=30) as client:
            for seed in (1, 2):
                events = list(client.speak("Hi.", seed=seed, send_audio=False))
                assert type(events[-1]).__name__ == "DoneEvent"
        # The fake engine counts the streams it opened; a heartbeat after the second job
        # carries 2 (the worker's warm-up opens none).
        status = d.wait_for(
            lambda s: s["workers"][0]["engine_counters"].get("streams_opened", 0) >= 2, 20,
            "a heartbeat counting both jobs' streams")
        assert status["workers"][0]["engine_counters"]["streams_opened"] == 2
