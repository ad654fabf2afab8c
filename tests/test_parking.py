"""A stopped reader does not hold the only worker (real daemon, real processes, SIGSTOP).

A local client takes one frame of a long job and is SIGSTOPped: its ring fills and the
worker waits on it. Another client's job, queued behind, must not wait for
`timeouts.client_call_s` (set far above the test's bound here): after
`timeouts.park_unread_s` the stopped client's job gives its worker up, the other job runs,
and once the stopped client is continued its job resumes where it was, every frame once,
in order, each the same as in an undisturbed run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import pytest
from daemon_harness import run_daemon

from avatard.ipc.client import Client, DoneEvent, FrameEvent

FAKE = {"frame_ms": 5.0}
TEXT = " ".join(["A long job that fills its ring while its reader sleeps."] * 6)
SEED = 11
# The stopped client's slots are not taken back within the test: only parking frees the
# worker for the other client.
CLIENT_CALL_S = 600.0

READER = r"""
import hashlib, json, sys
from avatard.ipc.client import Client, DoneEvent, FrameEvent
endpoint, text, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen, done = [], None
with Client(endpoint, timeout_s=300.0, name="sleepy") as client:
    for event in client.speak(text, seed=seed, send_audio=False):
        if isinstance(event, FrameEvent):
            seen.append((event.index, hashlib.sha1(event.array.tobytes()).hexdigest()))
            if len(seen) == 1:
                print("reading", flush=True)  # the test stops this process now
        elif isinstance(event, DoneEvent):
            done = event.frames
print(json.dumps({"frames": seen, "done": done}), flush=True)
"""


def _frames(
    client: Client, text: str, seed: int, deadline_s: float = 0.0
) -> tuple[list[tuple[int, str]], int]:
    seen, done = [], -1
    for event in client.speak(text, seed=seed, send_audio=False, deadline_s=deadline_s):
        if isinstance(event, FrameEvent):
            seen.append((event.index, hashlib.sha1(event.array.tobytes()).hexdigest()))
        elif isinstance(event, DoneEvent):
            done = event.frames
    return seen, done


@pytest.mark.timeout(300)
def test_a_stopped_reader_yields_the_worker_and_resumes_exactly_once(tmp_path):
    with run_daemon(
        tmp_path,
        workers=1,
        fake=FAKE,
        timeouts={"client_call_s": CLIENT_CALL_S, "park_unread_s": 1.0},
    ) as d:
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, d.endpoint, TEXT, str(SEED)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout.readline().strip() == "reading", reader.stderr.read()
            reader.send_signal(signal.SIGSTOP)
            # The other client's job completes long before client_call_s could free the
            # worker (its client's own bound is 120 s; the stopped one holds 600 s).
            with Client(d.endpoint, timeout_s=120.0, name="other") as other:
                # Its deadline fails it clearly (timeout) if the worker is never freed.
                frames, done = _frames(other, "A short one.", 3, deadline_s=90.0)
            assert done == len(frames) > 0
            assert "parked: its client read nothing for" in d.log_text()
        finally:
            reader.send_signal(signal.SIGCONT)
        out, err = reader.communicate(timeout=240)
        assert reader.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        indices = [index for index, _ in report["frames"]]
        assert indices == list(range(report["done"])), "every frame once, in order"
        # The resumed run rendered the same frames an undisturbed run renders.
        with Client(d.endpoint, timeout_s=120.0, name="reference") as client:
            reference, _ = _frames(client, TEXT, SEED)
        assert [list(f) for f in reference] == report["frames"]
        stats = d.status()["jobs"]
        assert stats["jobs_done"] >= 3 and stats["jobs_failed"] == 0
