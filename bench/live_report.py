"""Outputs of `avatard bench live`: live.json (the whole report), live.md (the table and
how it was made), live.png (latency CDFs, one line per configuration), and the table the
command prints. The report is the dict `bench.live.run_live_bench` builds: run facts
(command, commit, device, load) and one record per configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .live import JSON_NAME, LATE_SHARE_MAX, MARKDOWN_NAME, NOT_APPLICABLE, PLOT_NAME

MIB = 1024 * 1024
# Table columns of latencies: (metric, header).
LATENCY_COLUMNS = (
    ("audio_to_frame", "audio -> frame p50 / p99 ms (n)"),
    ("text_to_first_frame", "text -> first frame p50 / p99 ms (n)"),
    ("sentence_to_first_frame", "sentence -> first frame p50 / p99 ms"),
    ("barge_in_finished", "barge-in -> finished p50 / p99 ms (n)"),
    ("barge_in_silent", "barge-in -> silent frame p50 / p99 ms"),
)
# The plot's panels: (title, [(metric, line label suffix)]).
PANELS = (
    ("audio sent -> its first frame", [("audio_to_frame", "")]),
    ("text: first token / first sentence sent -> first frame",
     [("text_to_first_frame", " token"), ("sentence_to_first_frame", " sentence")]),
    ("barge-in sent -> first silent frame / playback_finished",
     [("barge_in_silent", " silent"), ("barge_in_finished", " finished")]),
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _pair(summary: dict[str, Any], with_n: bool) -> str:
    if not summary["n"]:
        return "-"
    text = f"{_ms(summary['p50'])} / {_ms(summary['p99'])}"
    return f"{text} ({summary['n']})" if with_n else text


def _mib(values: Any) -> str:
    if values == NOT_APPLICABLE:
        return NOT_APPLICABLE
    return ", ".join(str(round(b / MIB)) for b in values) or "-"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per configuration: latencies (p50 / p99, sample count), pacing, frame
    counts, realtime sessions, memory and the load average around the run."""
    beside = any(r["config"].get("beside") for r in report["records"])
    head = (["engine", "workers", "sessions", "realtime sessions"]
            + (["batch streams beside", "realtime batch streams", "batch frames/s"]
               if beside else [])
            + [header for _, header in LATENCY_COLUMNS]
            + ["frame jitter p99 ms", "frames received / sent", "dropped", "late",
               "worker RSS MiB", "GPU MiB", "load avg"])
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for record in report["records"]:
        c, m = record["config"], record["metrics"]
        lat = m["latency_ms"]
        load = record["load_average"]
        cells = ([c["engine"], str(c["workers"]), str(c["sessions"]),
                  f"{m['realtime_sessions']}/{c['sessions']}"]
                 + ([str(c.get("beside", 0)),
                     f"{m.get('batch_realtime_streams', 0)}/{c.get('beside', 0)}",
                     str(m.get("batch_frames_per_s") or "-")] if beside else [])
                 + [_pair(lat[name], "(n)" in header) for name, header in LATENCY_COLUMNS]
                 + [_ms(lat["frame_jitter"]["p99"]),
                    f"{m['frames_received']} / {m['frames_sent']}",
                    str(m["frames_dropped"]), str(m["late_frames"]),
                    _mib(m["rss_bytes"]["workers"]), _mib(m["gpu_memory_bytes"]),
                    f"{load['before'][0]:.1f} -> {load['after'][0]:.1f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, report: dict[str, Any]) -> list[Path]:
    """live.json (everything) and live.md (the table with the command, machine, commit
    and what the columns mean)."""
    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(report, indent=2))
    records = report["records"]
    when = (f"{records[0]['started']} to {records[-1]['ended']}" if records
            else report["timestamp"])
    text = [
        "# avatard bench live", "",
        f"command: `{report['command']}`", "",
        f"device: {report['device']}; driver {report['driver_version']}; avatard "
        f"{report['avatard_version']}; commit {report['git_commit']}"
        f"{' (dirty)' if report['git_dirty'] else ''}; measured {when} (UTC)", "",
        "Latencies are client side, ms, p50 / p99 over every sample of the configuration "
        "(n samples). audio -> frame: an audio segment's first chunk sent -> the frame "
        "made from its first samples received. text -> first frame: a text segment's "
        "first token sent -> its first speech frame received (sentence: from the token "
        "that completed its first sentence). barge-in: `live_interrupt` sent -> "
        "`playback_finished` (interrupted) received, and -> the first silent frame "
        "received. Frame jitter: |arrival gap - index gap / fps| of consecutive frames. "
        f"A session is realtime when it dropped no frame and under {LATE_SHARE_MAX:.0%} "
        "of its frames were late. Load avg: the 1-minute load average before -> after.",
        "",
        markdown_table(report) if records else "(no configuration measured)", "",
    ]
    md_path = out / MARKDOWN_NAME
    md_path.write_text("\n".join(text))
    return [json_path, md_path]


def write_plot(out: Path, report: dict[str, Any]) -> Path | str:
    """live.png: the latency CDFs of each configuration, one panel per measure. Returns
    the path, or why there is none (matplotlib is the optional `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window, also without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'avatard[bench]'): no plot"
    import numpy as np

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.5 * len(PANELS), 4), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], PANELS, strict=True):
        drawn = 0
        for n, record in enumerate(report["records"]):
            c = record["config"]
            for style, (metric, suffix) in zip(("-", "--"), metrics, strict=False):
                values = np.sort(np.asarray(record["metrics"]["samples_ms"][metric]))
                if not values.size:
                    continue
                # From share 0 at the smallest sample, so a single sample is a visible step.
                ax.step(np.concatenate([values[:1], values]),
                        np.arange(values.size + 1) / values.size, where="post",
                        color=f"C{n % 10}", linestyle=style,
                        label=f"{c['engine']} W={c['workers']} S={c['sessions']}{suffix}")
                drawn += 1
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ms")
        ax.set_ylabel("share of samples")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = out / PLOT_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
