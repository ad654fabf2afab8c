"""`avatard bench web`: browsers watching live sessions through `avatard web`, N viewers at
once, in headless Chromium (the same driver as the browser tests).

Per viewer count N, with a fresh gateway and browser each time:
- first frame: from the page's `connect()` call to its first presented video frame
  (`requestVideoFrameCallback`), as the page measures it: config fetch, offer, ICE, DTLS,
  first keyframe, decode. The first viewer also opens the session;
- fps held: frames decoded per second of the page's clock over the measured window, and
  frames the browser dropped, the gateway dropped (a viewer's queue overflowed) and the
  daemon skipped (the gateway read late);
- gateway CPU: the gateway process's CPU time (all its threads: aiortc encodes in an
  executor) over the window, in % of one core, total and per viewer.

`--sessions one` (default): one live session, every other viewer watches it (the cost
per viewer is what is measured); `--sessions per-viewer`: one session per viewer (the
daemon renders N sessions). `--gateway-arg=--shared-encode` measures the gateway's
shared encode (one video encode per session) instead of aiortc's encode per viewer.
The browser and the daemon run on the same machine as the gateway and compete with it
for CPU; each row records the load average before its window.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from avatard.daemon import PrivateDaemon

GATEWAY_START_S = 60.0
FIRST_FRAME_TIMEOUT_S = 60.0
SETTLE_S = 2.0  # after the last viewer connected, before the window opens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Gateway:
    """`avatard web` in a child process on loopback (its CPU is what is measured)."""

    def __init__(
        self, endpoint: str, codec: str, viewers: int, log: Path, extra: tuple[str, ...] = ()
    ) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "avatard.daemon.cli",
                "web",
                "--listen",
                f"127.0.0.1:{port}",
                "--endpoint",
                endpoint,
                "--codec",
                codec,
                "--loopback-media",
                "--max-sessions",
                str(viewers),
                "--max-viewers",
                str(viewers),
                "--max-viewers-per-client",
                str(viewers),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        deadline = time.monotonic() + GATEWAY_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/status", timeout=5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"avatard web did not answer within "
                        f"{GATEWAY_START_S:.0f} s: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)

    def cpu_s(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (Chromium's renderers and GPU process)."""
    total = 0.0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


STATS_JS = """
window.avatard.readStats().then(() => ({
  stats: window.avatard.state.stats, gateway: window.avatard.state.gateway,
  viewer: window.avatard.state.viewerId, now: performance.now(),
  firstFrameMs: window.avatard.state.firstFrameMs}))
"""


async def _snapshot(page) -> dict[str, Any]:
    state = await page.evaluate(STATS_JS)
    mine = state["gateway"].get("viewers", {}).get(state["viewer"], {})
    return {
        **state["stats"],
        "now": state["now"],
        "first_frame_ms": state["firstFrameMs"],
        "gw_dropped": mine.get("video_dropped", 0),
        "gw_missing": state["gateway"].get("frames_missing", 0),
    }


async def measure(
    endpoint: str,
    viewers: int,
    seconds: float,
    codec: str,
    sessions: str,
    workdir: Path,
    gateway_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One configuration: `viewers` pages, the window `seconds` long. Returns the row."""
    from avatard.web.browser import Chromium

    gateway = _Gateway(endpoint, codec, viewers, workdir / f"web-{viewers}.log", gateway_args)
    try:
        async with await Chromium.start() as browser:
            pages = []
            session_id = None
            for k in range(viewers):
                page = await browser.new_page(gateway.url + "/")
                await page.wait_for("window.avatard !== undefined", 60, "page script")
                watch = json.dumps(session_id if sessions == "one" and k else None)
                await page.evaluate(f"window.avatard.connect({{watch: {watch}}})", timeout_s=60)
                error = await page.evaluate("window.avatard.state.error")
                if error:
                    raise RuntimeError(f"viewer {k + 1} could not connect: {error}")
                await page.wait_for(
                    "window.avatard.state.firstFrameMs",
                    FIRST_FRAME_TIMEOUT_S,
                    f"first frame of viewer {k + 1}",
                )
                session_id = session_id or await page.evaluate("window.avatard.state.sessionId")
                pages.append(page)
            await asyncio.sleep(SETTLE_S)
            load_before = os.getloadavg()
            before = [await _snapshot(p) for p in pages]
            cpu0, wall0 = gateway.cpu_s(), time.monotonic()
            browser_cpu0 = _tree_cpu_s(browser.proc.pid)
            await asyncio.sleep(seconds)
            cpu1, wall1 = gateway.cpu_s(), time.monotonic()
            browser_cpu1 = _tree_cpu_s(browser.proc.pid)
            after = [await _snapshot(p) for p in pages]
    finally:
        gateway.stop()
    wall = wall1 - wall0
    fps, dropped_browser, dropped_gateway = [], 0, 0
    for b, a in zip(before, after, strict=True):
        window_s = (a["now"] - b["now"]) / 1000.0
        fps.append((a["framesDecoded"] - b["framesDecoded"]) / window_s)
        dropped_browser += a["framesDropped"] - b["framesDropped"]
        dropped_gateway += a["gw_dropped"] - b["gw_dropped"]
    gateway_cpu_pct = 100.0 * (cpu1 - cpu0) / wall
    first_frames = [b["first_frame_ms"] for b in before]
    return {
        "viewers": viewers,
        "sessions": sessions,
        "encode": "shared" if "--shared-encode" in gateway_args else "per-viewer",
        "codec": codec,
        "seconds": round(wall, 2),
        "first_frame_ms": {
            "first_viewer": round(first_frames[0], 1),
            "max": round(max(first_frames), 1),
            "median": round(sorted(first_frames)[len(first_frames) // 2], 1),
        },
        "fps": {"min": round(min(fps), 2), "mean": round(sum(fps) / len(fps), 2)},
        "frames_dropped": {
            "browser": dropped_browser,
            "gateway": dropped_gateway,
            "daemon": max(
                a["gw_missing"] - b["gw_missing"] for b, a in zip(before, after, strict=True)
            ),
        },
        "gateway_cpu_pct": round(gateway_cpu_pct, 1),
        "gateway_cpu_pct_per_viewer": round(gateway_cpu_pct / viewers, 1),
        "browser_cpu_pct": round(100.0 * (browser_cpu1 - browser_cpu0) / wall, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "cpu_count": os.cpu_count(),
        "gateway_args": list(gateway_args),
    }


def run_web_bench(
    viewers: list[int],
    seconds: float,
    codec: str,
    sessions: str,
    endpoint: str | None,
    engine: str,
    gateway_args: tuple[str, ...] = (),
    echo=print,
) -> dict[str, Any]:
    """Every viewer count against one daemon (a private one with `engine` unless
    `endpoint`); returns {"rows": [...]}."""
    rows = []
    tmp = tempfile.mkdtemp(prefix="avatard-bweb-")
    d = None
    try:
        if endpoint is None:
            jobs = max(viewers) if sessions == "per-viewer" else 1
            d = PrivateDaemon(
                Path(tmp),
                {
                    "daemon": {
                        "workers": 1,
                        "min_ready": 1,
                        "devices": "cpu",
                        "jobs_per_worker": jobs,
                    },
                    "engines": {"avatar": engine, "tts": "fake", "asr": "fake"},
                },
            )
            echo(f"starting a daemon: {engine} avatar")
            d.wait_for(lambda s: s["daemon"]["ready_workers"] >= 1, 600, "a ready worker")
            endpoint = d.endpoint
        for n in viewers:
            row = asyncio.run(
                measure(endpoint, n, seconds, codec, sessions, Path(tmp), gateway_args)
            )
            echo(format_row(row))
            rows.append(row)
    finally:
        if d is not None:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows}


def format_row(row: dict[str, Any]) -> str:
    ff, fps, dr = row["first_frame_ms"], row["fps"], row["frames_dropped"]
    return (
        f"viewers={row['viewers']:>2} ({row['sessions']} session(s), {row['encode']} encode, "
        f"{row['codec']}): first frame {ff['first_viewer']:.0f} ms (max {ff['max']:.0f}), "
        f"fps min {fps['min']:.1f} mean {fps['mean']:.1f}, dropped "
        f"{dr['browser']}/{dr['gateway']}/{dr['daemon']} (browser/gateway/daemon), gateway "
        f"CPU {row['gateway_cpu_pct']:.0f} % ({row['gateway_cpu_pct_per_viewer']:.1f} % per "
        f"viewer), browser CPU {row['browser_cpu_pct']:.0f} %"
    )


def format_table(report: dict[str, Any]) -> str:
    """The rows as a markdown table (docs/bench.md quotes it)."""
    lines = [
        "| viewers | sessions | encode | codec | first frame ms (first viewer / max) "
        "| fps min / mean | dropped browser / gateway / daemon "
        "| gateway CPU % of a core (per viewer) | browser CPU % | load before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ff, fps, dr = r["first_frame_ms"], r["fps"], r["frames_dropped"]
        lines.append(
            f"| {r['viewers']} | {r['sessions']} | {r['encode']} | {r['codec']} "
            f"| {ff['first_viewer']:.0f} / {ff['max']:.0f} "
            f"| {fps['min']:.1f} / {fps['mean']:.1f} "
            f"| {dr['browser']} / {dr['gateway']} / {dr['daemon']} "
            f"| {r['gateway_cpu_pct']:.0f} ({r['gateway_cpu_pct_per_viewer']:.1f}) "
            f"| {r['browser_cpu_pct']:.0f} | {r['load_average_before'][0]:.2f} |"
        )
    return "\n".join(lines)
