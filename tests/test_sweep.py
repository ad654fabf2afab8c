"""`avatard bench sweep` and `avatard bench overhead` on real daemons with the fake engine.

The figures are checked for consistency (every frame counted, one record per
configuration, resumability), never for speed: speed is measured by the commands.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import AVATARD

from avatard.bench import sweep_report
from avatard.bench.sweep import (
    NOT_APPLICABLE,
    SAMPLE_RATE,
    parse_list,
    run_sweep,
    speech_like_pcm,
)
from avatard.bench.sweep_overhead import format_overhead, run_overhead
from avatard.daemon import PrivateDaemon

FPS = 25  # the fake engine's default
# A small frame cost keeps the workers busy for a moment without slowing the suite.
FAKE = {"frame_ms": 2.0}
SETTINGS = {"timeouts.kill_grace_s": 2.0}  # a daemon config override (--set), in the key


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_speech_like_pcm_is_seeded_and_shaped():
    a = speech_like_pcm(2.0, 7)
    assert a.dtype == np.float32 and a.shape == (2 * SAMPLE_RATE,)
    assert np.array_equal(a, speech_like_pcm(2.0, 7))
    assert not np.array_equal(a, speech_like_pcm(2.0, 8))
    assert float(np.abs(a).max()) <= 1.0
    # Syllables and gaps: loud 10 ms windows and near-silent ones both occur.
    peaks = np.abs(a[: a.size // 160 * 160]).reshape(-1, 160).max(axis=1)
    assert (peaks > 0.1).mean() > 0.3 and (peaks < 0.02).mean() > 0.05


def test_parse_list_refuses_bad_values():
    assert parse_list("1, 2,4,2", int, "workers") == [1, 2, 4]
    assert parse_list("10,0.5", float, "seconds") == [10.0, 0.5]
    for bad in ("0", "a", "", "-1"):
        with pytest.raises(ValueError, match="--workers"):
            parse_list(bad, int, "workers")


def test_sweep_records_every_configuration_and_resumes(tmp_path: Path):
    out = tmp_path / "sweep"
    lines: list[str] = []
    result = run_sweep("fake", out, workers=[1, 2], streams=[1, 2], seconds=[1.0],
                       batches=[1, 4], options=FAKE, settings=SETTINGS, progress=False,
                       command="avatard bench sweep (test)", echo=lines.append)
    assert not result.failures, result.failures
    assert len(result.measured) == 4 and not result.skipped
    # The fake engine has no batch option: batch is recorded as n/a and not swept.
    assert any("no batch option" in line for line in lines)

    body = json.loads((out / sweep_report.RESULTS_JSON).read_text())
    records = body["records"]
    assert len(records) == 4
    assert len({r["key"] for r in records}) == 4
    combos = {(r["config"]["workers"], r["config"]["streams"]) for r in records}
    assert combos == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for r in records:
        c, m = r["config"], r["metrics"]
        assert c["batch"] == NOT_APPLICABLE and c["engine"] == "fake"
        assert c["options"] == FAKE and c["settings"] == SETTINGS
        assert r["command"] == "avatard bench sweep (test)"
        assert r["git_commit"] and r["device"] and r["driver_version"] and r["timestamp"]
        assert r["avatard_version"]
        assert m["jobs"] == c["streams"] and m["jobs_failed"] == 0 and not m["errors"]
        assert m["frames_received"] == FPS * c["streams"] == m["frames_reported"]
        assert m["frames_missing"] == 0 and m["frames_out_of_order"] == 0
        assert m["media_s"] == pytest.approx(c["streams"] * 1.0)
        assert m["rtf_p50"] > 0 and m["rtf_p95"] >= m["rtf_p50"]
        assert m["frames_per_s"] > 0 and m["videos_per_hour"] > 0
        assert 0 <= m["realtime_streams"] <= c["streams"]
        assert 0 < m["first_frame_s_p50"] <= m["first_frame_s_p95"]
        assert len(m["load_s"]) == c["workers"] and all(s > 0 for s in m["load_s"])
        assert len(m["rss_bytes"]["workers"]) == c["workers"]
        assert all(b > 0 for b in m["rss_bytes"]["workers"]) and m["rss_bytes"]["daemon"] > 0
        assert m["device_memory_bytes"] == [0] * c["workers"]  # CPU workers
        assert m["worker_devices"] == ["cpu"] * c["workers"]

    with open(out / sweep_report.RESULTS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {row["key"] for row in rows} == {r["key"] for r in records}
    assert all(float(row["metrics.rtf_p50"]) > 0 for row in rows)
    table = (out / sweep_report.RESULTS_MD).read_text()
    assert table.count("| fake |") == 4 and "realtime" in table
    if _has_matplotlib():
        for name in (sweep_report.PLOT_RTF, sweep_report.PLOT_THROUGHPUT):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in result.plots_note

    # Resume: everything is stored, so nothing runs (no daemon starts) and nothing changes.
    again = run_sweep("fake", out, workers=[1, 2], streams=[1, 2], seconds=[1.0],
                      options=FAKE, settings=SETTINGS, progress=False, echo=lambda line: None)
    assert again.measured == [] and len(again.skipped) == 4
    assert json.loads((out / sweep_report.RESULTS_JSON).read_text())["records"] == records

    # --force measures again, replacing the record instead of adding one.
    forced = run_sweep("fake", out, workers=[1], streams=[1], seconds=[1.0], options=FAKE,
                       settings=SETTINGS, force=True, progress=False, echo=lambda line: None)
    assert len(forced.measured) == 1
    stored = json.loads((out / sweep_report.RESULTS_JSON).read_text())["records"]
    assert len(stored) == 4
    redone = next(r for r in stored if r["key"] == forced.measured[0])
    assert redone["metrics"]["frames_received"] == FPS


def test_online_mode_on_a_running_daemon(tmp_path: Path):
    """--endpoint drives a daemon someone else started; online rounds start together."""
    workdir = tmp_path / "d"
    workdir.mkdir()
    d = PrivateDaemon(workdir, {
        "daemon": {"workers": 1, "min_ready": 1, "devices": "cpu"},
        "engines": {"avatar": "fake", "tts": "fake", "asr": "fake"},
        "engines.options.fake": FAKE})
    try:
        d.wait_for(lambda s: s["daemon"]["ready_workers"] == 1, 60, "READY")
        with pytest.raises(ValueError, match="runs 1 workers"):
            run_sweep(None, tmp_path / "x", endpoint=d.endpoint, workers=[2], progress=False,
                      echo=lambda line: None)
        with pytest.raises(ValueError, match="--set"):
            run_sweep(None, tmp_path / "x", endpoint=d.endpoint, settings=SETTINGS,
                      progress=False, echo=lambda line: None)
        result = run_sweep(None, tmp_path / "out", endpoint=d.endpoint, streams=[2],
                           seconds=[0.5], mode="online", repeat=2, progress=False,
                           echo=lambda line: None)
    finally:
        assert d.stop() == 0
    assert not result.failures
    (record,) = result.records
    c, m = record["config"], record["metrics"]
    assert c["daemon"] == d.endpoint and c["engine"] == "fake" and c["workers"] == 1
    assert c["mode"] == "online" and c["batch"] == NOT_APPLICABLE
    assert m["jobs"] == 4 and m["frames_received"] == 4 * round(0.5 * FPS)
    assert m["frames_missing"] == 0 and 0 <= m["realtime_streams"] <= 2


def test_overhead_compares_direct_and_daemon():
    report = run_overhead(frame_ms=2.0, seconds=1.0, size=64, repeat=2)
    assert report["frames"] == FPS
    for path in ("direct", "daemon"):
        assert report[path]["per_frame_s"] > 0 and report[path]["first_frame_s"] > 0
        assert len(report["runs"][path]) == 2
        assert all(run["frames"] == FPS for run in report["runs"][path])
    assert set(report["added"]) >= {"per_frame_s", "per_frame_pct", "first_frame_s"}
    assert set(report["targets"]) >= {"per_frame_met", "first_frame_met"}
    text = format_overhead(report)
    assert "direct (in process)" in text and "daemon (1 worker" in text


def test_cli_sweep_when_registered(tmp_path: Path):
    """The click command lives in daemon/cli.py; this runs once it is registered there."""
    probe = subprocess.run([AVATARD, "bench", "sweep", "--help"], capture_output=True,
                           text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("`avatard bench sweep` is not registered in daemon/cli.py yet")
    out = tmp_path / "cli"
    run = subprocess.run([AVATARD, "bench", "sweep", "--engine", "fake", "--workers", "1",
                          "--streams", "1", "--seconds", "0.5", "--option", "frame_ms=1",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| fake | 1 |" in run.stdout
    assert len(json.loads((out / "results.json").read_text())["records"]) == 1
    shutil.rmtree(out)


def test_ditto_batch_default_leaves_the_engine_option_alone() -> None:
    from avatard.bench.sweep import ENGINE_DEFAULT, engine_sections

    default = engine_sections("ditto", 1, ENGINE_DEFAULT, "random", {}, streams_max=4)
    assert default["engines.options.ditto"] == {"weights": "random"}
    swept = engine_sections("ditto", 1, 8, "random", {}, streams_max=4)
    assert swept["engines.options.ditto"] == {"weights": "random", "max_batch": 8}
