"""The Prometheus endpoint reads status snapshots that the supervisor loop builds on its own
thread (`StatusHandoff`), never the job book, pool or sessions from the HTTP threads."""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.request

import pytest
from daemon_harness import free_port, run_daemon

from avatard.daemon.status import StatusHandoff
from avatard.ipc.client import DoneEvent

WAIT_S = 30.0  # bound on every wait of these tests (never asserted on)


def test_readers_on_other_threads_get_bodies_built_on_the_loop_thread():
    handoff = StatusHandoff()
    stop = threading.Event()

    def loop() -> None:  # what Supervisor.tick does, as fast as it can
        built = 0
        while not stop.is_set():
            if handoff.wanted:
                built += 1
                handoff.publish({"built_on": threading.get_ident(), "built": built})

    loop_thread = threading.Thread(target=loop, name="loop")
    loop_thread.start()
    seen: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            seen[k] = [handoff.take(WAIT_S) for _ in range(200)]
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    try:
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(WAIT_S)
    finally:
        stop.set()
        loop_thread.join(WAIT_S)
    assert not errors and len(seen) == 4
    for bodies in seen.values():
        assert {body["built_on"] for body in bodies} == {loop_thread.ident}
        counts = [body["built"] for body in bodies]
        assert counts == sorted(counts)  # never an older body than one already seen


def test_a_loop_that_does_not_answer_is_a_timeout_naming_what_was_awaited():
    with pytest.raises(TimeoutError, match="supervisor loop built no status snapshot "
                                           "within 0.01 s"):
        StatusHandoff().take(0.01)


def _scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(avatard_\S+) (\S+)$", text, re.MULTILINE)}


def test_scrapes_while_jobs_run_and_a_worker_dies_see_whole_snapshots(tmp_path):
    pytest.importorskip("prometheus_client")
    port = free_port()
    workers, jobs = 2, 8
    with run_daemon(tmp_path, workers=workers, fake={"width": 16, "height": 16,
                                                     "frame_ms": 5},
                    daemon={"metrics_port": port, "jobs_per_worker": 2}) as d:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == workers, WAIT_S, "both ready")
        finished = threading.Event()
        problems: list[str] = []
        scrapes: list[int] = []
        done_events: list[DoneEvent] = []

        def scraper() -> None:
            done_seen, count = 0.0, 0
            while True:  # at least one scrape, however quickly the jobs end
                try:
                    figures = _scrape(port)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    problems.append(f"scrape failed: {type(exc).__name__}: {exc}")
                    break
                count += 1
                states = sum(v for k, v in figures.items() if k.startswith("avatard_workers{"))
                if states != workers:
                    problems.append(f"{states} workers by state, not {workers}")
                done = figures['avatard_jobs_total{outcome="done"}']
                if done < done_seen:
                    problems.append(f"jobs done went back from {done_seen} to {done}")
                done_seen = done
                if finished.is_set():
                    break
            scrapes.append(count)

        def job(seed: int) -> None:
            with d.client() as client:  # a session each: sessions open and end meanwhile
                events = list(client.speak("One two three. Four five six.", seed=seed))
            done_events.extend(e for e in events if isinstance(e, DoneEvent))

        scrapers = [threading.Thread(target=scraper) for _ in range(3)]
        job_threads = [threading.Thread(target=job, args=(k,)) for k in range(jobs)]
        for thread in (*scrapers, *job_threads):
            thread.start()
        # Kill a busy worker: its jobs leave the book's placement and are requeued.
        status = d.wait_for(lambda s: any(w["current_jobs"] for w in s["workers"]), WAIT_S,
                            "a busy worker")
        victim = next(w for w in status["workers"] if w["current_jobs"])
        os.kill(victim["pid"], signal.SIGKILL)
        for thread in job_threads:
            thread.join(WAIT_S)
        finished.set()
        for thread in scrapers:
            thread.join(WAIT_S)
        final = _scrape(port)
        log = d.log_text()
    assert not problems, problems[:5]
    assert len(scrapes) == 3 and min(scrapes) >= 1
    assert len(done_events) == jobs
    assert final['avatard_jobs_total{outcome="done"}'] == jobs
    assert final['avatard_jobs_total{outcome="failed"}'] == 0
    assert "Traceback" not in log, log[-3000:]
