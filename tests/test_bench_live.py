"""`avatard bench live` on a real daemon with the fake engine: the report's structure and
its counts are checked (every frame counted once, a latency for every segment that had
one), never its figures: speed is measured by the command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import AVATARD

from avatard.bench.live import (
    CHUNK_S,
    LATENCIES,
    SAMPLE_RATE,
    Agent,
    plan_segment,
    run_live_bench,
)

# Seed 3 with half the segments text and every one interrupted: session 0 begins with an
# interrupted audio segment, session 1 with an interrupted text one (seeded plans), so a
# short run of 2 sessions has every kind of latency.
SEED, TEXT_SHARE, INTERRUPT_SHARE = 3, 0.5, 1.0


def test_plans_are_seeded_and_well_formed():
    plans = [plan_segment(np.random.default_rng([5, i]), f"s{i}", 0.5, 0.5) for i in range(40)]
    again = [plan_segment(np.random.default_rng([5, i]), f"s{i}", 0.5, 0.5) for i in range(40)]
    assert [(p.kind, p.interrupt_after_s, len(p.items)) for p in plans] == [
        (p.kind, p.interrupt_after_s, len(p.items)) for p in again]
    assert {p.kind for p in plans} == {"audio", "text"}
    for plan in plans:
        if plan.kind == "audio":
            step = round(CHUNK_S * SAMPLE_RATE)
            assert all(c.dtype == np.float32 and c.size == step for c in plan.items[:-1])
            assert 0 < plan.items[-1].size <= step
        else:
            # The first sentence ends with its end punctuation and a space (complete
            # there), or is the whole text (complete with the last token, sent final).
            first_end = plan.items[plan.sentence_token]
            assert first_end[-2:] in (". ", "? ") or (
                plan.sentence_token == len(plan.items) - 1 and first_end[-1] in ".?")
            assert not any(t[-2:] in (". ", "? ") for t in plan.items[:plan.sentence_token])
            assert plan.items[-1][-1] in ".?"
    # The run below relies on these first segments.
    firsts = [Agent(i, SEED, 4, TEXT_SHARE, INTERRUPT_SHARE).plan for i in range(2)]
    assert [p.kind for p in firsts] == ["audio", "text"]
    assert all(p.interrupt_after_s is not None for p in firsts)


def test_a_running_daemon_keeps_its_config(tmp_path: Path):
    with pytest.raises(ValueError, match="--workers, --option and --set"):
        run_live_bench("fake", [1], 2.0, tmp_path, endpoint="ipc:///nowhere", workers=[1])
    with pytest.raises(ValueError, match="--tts"):
        run_live_bench("fake", [1], 2.0, tmp_path, tts="nobody")


def test_cli_live_bench_counts_every_frame_and_measures_each_kind(tmp_path: Path):
    out = tmp_path / "live"
    run = subprocess.run(
        [AVATARD, "bench", "live", "--engine", "fake", "--sessions", "2", "--seconds", "4",
         "--option", "width=32", "--option", "height=32", "--set", "daemon.devices=cpu",
         "--text-share", str(TEXT_SHARE), "--interrupt-share", str(INTERRUPT_SHARE),
         "--seed", str(SEED), "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report == json.loads((out / "live.json").read_text())
    assert "| engine | workers | sessions |" in (out / "live.md").read_text()
    assert report["command"].startswith("avatard bench live --engine fake")
    (record,) = report["records"]
    assert record["config"]["sessions"] == 2 and record["config"]["engine"] == "fake"
    m = record["metrics"]
    assert m["errors"] == [] and m["sessions_done"] == 2
    assert 0 <= m["realtime_sessions"] <= 2
    for session in m["per_session"]:
        # Every frame the session's done counted was received, once and in order.
        assert session["frames_sent"] > 0
        assert session["frames_received"] == session["frames_sent"]
        assert session["out_of_order"] == 0 and session["inputs_refused"] == []
        assert session["realtime"] == (session["frames_dropped"] == 0
                                       and session["late_frames"] < 0.01 * session["frames_sent"])
    assert m["frames_received"] == m["frames_sent"] == sum(
        s["frames_received"] for s in m["per_session"])
    assert m["gpu_memory_bytes"] == "n/a" and len(m["rss_bytes"]["workers"]) == 1
    assert all(b > 0 for b in m["rss_bytes"]["workers"])

    latency, samples = m["latency_ms"], m["samples_ms"]
    assert set(latency) == set(LATENCIES)
    for name in LATENCIES:
        summary = latency[name]
        if name != "frame_jitter":
            assert summary["n"] == len(samples[name])
            assert all(v > 0 for v in samples[name]), name
        if summary["n"]:
            assert summary["p50"] <= summary["p99"] <= summary["max"]
    for name in ("audio_to_frame", "text_to_first_frame", "sentence_to_first_frame",
                 "barge_in_finished", "barge_in_silent", "open_to_first_frame"):
        assert latency[name]["n"] >= 1, name
    assert latency["open_to_first_frame"]["n"] == 2
    assert latency["frame_jitter"]["n"] == m["frames_received"] - 2  # pairs per session
    # The first sentence is complete after the first token is sent, never before.
    assert all(s <= t for s, t in zip(samples["sentence_to_first_frame"],
                                      samples["text_to_first_frame"], strict=True))
    assert m["interrupts_sent"] >= m["barge_ins_measured"] == latency["barge_in_finished"]["n"]
    assert latency["barge_in_silent"]["n"] <= latency["barge_in_finished"]["n"]
    assert m["segments_audio"] >= latency["audio_to_frame"]["n"]
    assert m["segments_text"] >= latency["text_to_first_frame"]["n"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "live.png").stat().st_size > 0


def test_batch_streams_beside_the_sessions_are_counted(tmp_path: Path):
    # One session with two batch streams beside it, then the session alone: the batch
    # figures appear only where streams ran, every frame of theirs was received, and the
    # table gets its batch columns.
    result = run_live_bench("fake", [1], 3.0, tmp_path, beside=[2, 0],
                            options={"width": 32, "height": 32},
                            settings={"daemon.devices": "cpu"}, seed=SEED,
                            echo=lambda line: None)
    assert result.failures == []
    with_batch, alone = result.report["records"]
    assert with_batch["config"]["beside"] == 2 and alone["config"]["beside"] == 0
    m = with_batch["metrics"]
    assert m["batch_streams"] == 2 and m["batch_errors"] == []
    assert m["batch_jobs"] >= 2 and m["batch_jobs_failed"] == 0
    assert 0 <= m["batch_realtime_streams"] <= 2 and m["batch_frames_per_s"] > 0
    assert m["sessions_done"] == 1 and m["frames_received"] == m["frames_sent"]
    assert "batch_streams" not in alone["metrics"]
    table = (tmp_path / "live.md").read_text()
    assert "| batch streams beside | realtime batch streams | batch frames/s |" in table
    with pytest.raises(ValueError, match="--beside"):
        run_live_bench("fake", [1], 2.0, tmp_path, beside=[-1])


def test_beside_zero_is_a_valid_list_value():
    from avatard.bench.sweep import parse_list

    assert parse_list("0,4,4", int, "beside", zero_ok=True) == [0, 4]
    with pytest.raises(ValueError, match="--sessions: values must be > 0"):
        parse_list("0", int, "sessions")
