"""`avatard serve --parent-fd`: a daemon started as a program's child drains and exits
when that program dies, even by SIGKILL (the cluster's node replicas rely on it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil

from avatard.ipc.segments import segments_of

CALLER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from avatard.daemon import PrivateDaemon
    d = PrivateDaemon(Path(sys.argv[1]), {
        "daemon": {"workers": 1, "devices": "cpu"},
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
    }, die_with_caller=True)
    d.wait_ready(60)
    print(d.proc.pid, flush=True)
    time.sleep(600)
""")


def test_a_daemon_whose_caller_was_killed_drains_and_leaves_nothing(tmp_path):
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = caller.stdout.readline()
        assert line.strip().isdigit(), f"the caller printed no daemon pid: {line!r}"
        daemon_pid = int(line)
        daemon = psutil.Process(daemon_pid)
        workers = daemon.children()
        assert segments_of(daemon_pid), "a running daemon owns segments"
        caller.send_signal(signal.SIGKILL)
        caller.wait(10)
        # Bounded: the daemon notices the pipe's end within a tick and has no jobs.
        gone, alive = psutil.wait_procs([daemon, *workers], timeout=30)
        assert not alive, f"still running 30 s after the caller died: {alive}"
        assert segments_of(daemon_pid) == []
        assert "parent pipe closed" in (tmp_path / "daemon.log").read_text()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(10)
        # The daemon is a grandchild: end it by its pid if the test failed before.
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                proc.kill()
