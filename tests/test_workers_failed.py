"""A daemon whose every worker has failed for good (issue 16): it refuses new jobs at once
with `unavailable`, naming the workers' failure, and ends the jobs it had queued when the
last worker gives up, instead of holding them silently until their deadline. Real daemon,
real worker processes: the fake engine fails each load (load_error)."""

from __future__ import annotations

import pytest
from daemon_harness import run_daemon

from avatard.ipc import protocol as P
from avatard.ipc.client import ClientError, JobFailedError

# Every load of every worker fails halfway through a 2 s load; each worker tries twice.
FAILING = {"width": 32, "height": 32, "load_s": 2.0, "load_error": True}


def test_jobs_queued_fail_when_the_last_worker_gives_up_and_new_ones_are_refused(tmp_path):
    with run_daemon(tmp_path, workers=2, fake=FAILING, wait_ready=False,
                    restart={"max_load_attempts": 2},
                    daemon={"job_deadline_s": 600}) as d, d.client() as c:
        # Accepted while the workers still try to load: it waits in the queue.
        queued = c.speak("Hello there.", seed=1)
        with pytest.raises(JobFailedError) as failed:
            list(queued)
        assert failed.value.code == P.E_UNAVAILABLE
        message = str(failed.value)
        assert "worker 0" in message and "worker 1" in message, message
        assert "gave up after 2 load attempts" in message, message
        assert "injected load error" in message, message

        status = d.status()
        assert [w["state"] for w in status["workers"]] == ["failed", "failed"]

        # From now on every job request is refused at once, with the same reason.
        with pytest.raises(ClientError) as refused:
            c.speak("Anyone there?", seed=2)
        assert refused.value.code == P.E_UNAVAILABLE
        assert refused.value.field == "type"
        assert "worker 1: gave up after 2 load attempts" in str(refused.value)
        # Requests that need no worker are still answered.
        assert c.health().status == "failed"
