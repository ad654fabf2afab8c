"""Outputs of `avatard bench sweep`: results.json (the resumable store), results.csv,
results.md, PNG plots, and the facts about the run recorded in every record (git commit,
device, driver, avatard version)."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PLOT_RTF = "rtf.png"
PLOT_THROUGHPUT = "throughput.png"
STORE_VERSION = 1
MIB = 1024 * 1024


# ---------------------------------------------------------------------------- environment


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout avatard runs from; ("unknown", None) for an installed
    copy or a machine without git. Dirty counts tracked files only: untracked files do not
    change what was measured."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown", None
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return commit.stdout.strip(), dirty


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_facts() -> dict[str, Any]:
    """GPU names and driver through NVML (no torch), else the CPU model."""
    from avatard.daemon import gpu_inventory

    facts: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count() or 0}
    gpus = gpu_inventory()
    if gpus.names:
        facts["device"] = ", ".join(gpus.names)
        facts["driver_version"] = gpus.driver_version
    else:
        facts["device"] = f"CPU: {facts['cpu']} ({facts['cpu_count']} cores)"
        facts["driver_version"] = "n/a (no GPU)"
    return facts


def avatard_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avatard")
    except PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- store


def load_records(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS_JSON
    if not path.exists():
        return []
    body = json.loads(path.read_text())
    if body.get("version") != STORE_VERSION:
        raise ValueError(f"{path}: store version {body.get('version')!r}, this avatard "
                         f"writes {STORE_VERSION}; use another --out")
    return list(body["records"])


def save_records(out: Path, records: list[dict[str, Any]]) -> None:
    """Atomic (write, then rename): an interrupted sweep never leaves a torn store, so the
    next run resumes from every configuration finished before the interruption."""
    path = out / RESULTS_JSON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"version": STORE_VERSION, "records": records}, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- tables


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, into)
    elif isinstance(value, list):
        into[prefix] = json.dumps(value)
    else:
        into[prefix] = value


def write_csv(out: Path, records: list[dict[str, Any]]) -> Path:
    rows = []
    for record in records:
        row: dict[str, Any] = {}
        _flatten("", record, row)
        rows.append(row)
    columns: list[str] = []
    for row in rows:  # union of keys, in first-seen order (records of older runs may differ)
        columns += [k for k in row if k not in columns]
    path = out / RESULTS_CSV
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _jobs_per_worker(config: dict[str, Any]) -> Any:
    """Concurrent jobs per worker of the sweep's daemons (a --set override, default 1)."""
    return config.get("settings", {}).get("daemon.jobs_per_worker", 1)


def markdown_table(records: list[dict[str, Any]]) -> str:
    head = ("| engine | workers | jobs/worker | batch | streams | media s | audio Hz | mode | "
            "jobs | RTF p50 | RTF p95 | "
            "frames/s | videos/h | realtime streams | first frame p50 / p95 (s) | "
            "worker RSS MiB | device MiB / worker | load s / worker |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---:|---:|"]
    for r in records:
        c, m = r["config"], r["metrics"]
        rss = m["rss_bytes"]["workers"]
        dev_mem = m["device_memory_bytes"]
        loads = m["load_s"]
        lines.append(
            f"| {c['engine']} | {c['workers']} | {_jobs_per_worker(c)} | {c['batch']} | "
            f"{c['streams']} | "
            f"{c['seconds']:g} | {c.get('sample_rate', '-')} | {c['mode']} | {m['jobs']} | "
            f"{_fmt(m['rtf_p50'])} | "
            f"{_fmt(m['rtf_p95'])} | {_fmt(m['frames_per_s'], 1)} | "
            f"{_fmt(m['videos_per_hour'], 0)} | {m['realtime_streams']}/{c['streams']} | "
            f"{_fmt(m['first_frame_s_p50'])} / {_fmt(m['first_frame_s_p95'])} | "
            f"{', '.join(str(round(b / MIB)) for b in rss) or '-'} | "
            f"{', '.join(str(round(b / MIB)) for b in dev_mem) or '-'} | "
            f"{', '.join(f'{s:.2f}' for s in loads) or '-'} |")
    return "\n".join(lines)


def _distinct(records: list[dict[str, Any]], *path: str) -> str:
    values: list[str] = []
    for r in records:
        value: Any = r
        for key in path:
            value = value.get(key, "-") if isinstance(value, dict) else "-"
        if str(value) not in values:
            values.append(str(value))
    return "; ".join(values)


def write_markdown(out: Path, records: list[dict[str, Any]]) -> Path:
    """results.md: every stored record, with the commands, machines and commits they
    came from (a resumed or extended sweep mixes several runs)."""
    commands = []
    for r in records:
        if r.get("command", "-") not in commands:
            commands.append(r.get("command", "-"))
    text = [
        "# avatard bench sweep", "",
        "commands:", "", *[f"- `{c}`" for c in commands], "",
        f"device: {_distinct(records, 'device')}; driver {_distinct(records, 'driver_version')}"
        f"; avatard {_distinct(records, 'avatard_version')}; commit "
        f"{_distinct(records, 'git_commit')}; measured {records[0]['timestamp']} to "
        f"{records[-1]['timestamp']}", "",
        "RTF = client wall time (request sent to `done` received) / media seconds. A stream "
        "is realtime when every frame arrives by job start + allowance "
        f"({_distinct(records, 'config', 'allowance_s')} s) + frame pts. Input: seeded "
        "synthetic speech-like PCM (no TTS in the measurement).",
        "",
        markdown_table(records), "",
    ]
    path = out / RESULTS_MD
    path.write_text("\n".join(text))
    return path


# ---------------------------------------------------------------------------- plots


def write_plots(out: Path, records: list[dict[str, Any]]) -> list[Path] | str:
    """rtf.png and throughput.png, each with one panel per swept dimension (workers, batch,
    streams) and one line per combination of the other dimensions. Returns the paths, or
    why there are none (matplotlib is the optional `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window, also without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'avatard[bench]'): no plots"
    dims = ("workers", "batch", "streams")
    paths = []
    for filename, metric, label in ((PLOT_RTF, "rtf_p50", "RTF p50 (lower is faster)"),
                                    (PLOT_THROUGHPUT, "frames_per_s", "frames/s (all streams)")):
        fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
        for ax, dim in zip(axes[0], dims, strict=True):
            lines: dict[str, list[tuple[float, float]]] = {}
            for r in records:
                c = r["config"]
                x = c[dim]
                y = r["metrics"][metric]
                if not isinstance(x, int) or y is None:
                    continue  # batch "n/a": the engine has no batch option
                others = [d for d in dims if d != dim] + ["seconds", "mode"]
                name = ", ".join(f"{d}={c[d]:g}" if isinstance(c[d], float) else f"{d}={c[d]}"
                                 for d in others)
                lines.setdefault(name, []).append((x, y))
            for name, points in sorted(lines.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            xs = sorted({p[0] for points in lines.values() for p in points})
            if xs:
                # Sweeps double their sizes (1, 2, 4, 8...): a log2 axis spaces them evenly.
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.minorticks_off()
            ax.set_xlabel(dim)
            ax.set_ylabel(label)
            if not lines:
                ax.text(0.5, 0.5, f"{dim}: not swept (no numeric values)", ha="center",
                        va="center", transform=ax.transAxes)
            elif len(lines) <= 8:
                ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
