"""The picture of a chaos run: throughput and latency of acknowledged sends over time,
with the fault windows shaded, as a PNG and in a self-contained HTML report.

``timeline`` is pure (bins over the history); ``write_report`` draws it with matplotlib
(off-screen) and writes ``report.png`` and ``report.html`` beside the history.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.history import RESET, History

BIN_S = 0.25


@dataclass(frozen=True)
class Timeline:
    starts_s: list[float]
    acks_per_s: list[float]
    p99_latency_ms: list[float | None]
    faults: list[tuple[str, float, float]]


def timeline(history: History, bin_s: float = BIN_S) -> Timeline:
    """Acknowledged sends per second and their p99 latency, per ``bin_s`` of the run
    (a send counts when its acknowledgement came), and the fault windows."""
    acked = [op for op in history.sends() if op.outcome == "ok"]
    end = max((op.end_s for op in history), default=0.0)
    bins = int(end / bin_s) + 1
    counts = [0] * bins
    latencies: list[list[float]] = [[] for _ in range(bins)]
    for op in acked:
        index = min(int(op.end_s / bin_s), bins - 1)
        counts[index] += 1
        latencies[index].append((op.end_s - op.start_s) * 1000)
    p99: list[float | None] = []
    for values in latencies:
        if not values:
            p99.append(None)
            continue
        values.sort()
        p99.append(values[min(len(values) - 1, int(0.99 * (len(values) - 1) + 0.5))])
    faults = [
        (op.fault or "fault", op.start_s, op.end_s) for op in history.faults() if op.fault != RESET
    ]
    return Timeline([i * bin_s for i in range(bins)], [c / bin_s for c in counts], p99, faults)


def _figures_html(history: History, verdict: dict[str, Any]) -> str:
    """Summary figures and one row per fault: the nodes hit, and how long produce and
    metadata operations were unavailable."""
    checks = verdict.get("verdict", {})
    rows = [
        ("operations", len(history)),
        ("acknowledged records", verdict.get("acknowledged")),
        ("faults injected", len(verdict.get("faults", []))),
        ("converged after healing (s)", verdict.get("converged_s")),
        ("data checkers", ", ".join(checks.get("anomalies", {})) or "no anomaly"),
    ]
    for name in ("quorum", "metadata", "images"):
        part = checks.get(name, {})
        found = ", ".join(part.get("anomalies", {})) or "no anomaly"
        rows.append((f"{name} checks", f"{'valid' if part.get('valid') else 'INVALID'}: {found}"))
    summary = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    details = [op.detail for op in history.faults() if op.fault != RESET]
    faults = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(cell))}</td>"
            for cell in (
                data["fault"],
                f"{data['start_s']:.2f}-{data['end_s']:.2f}",
                detail,
                f"{data['unavailable_s']:.2f}",
                f"{meta['unavailable_s']:.2f}",
            )
        )
        + "</tr>"
        for data, meta, detail in zip(
            verdict.get("unavailability", []),
            verdict.get("metadata_unavailability", []),
            details,
            strict=False,
        )
    )
    return (
        f"<h2>Figures</h2><table>{summary}</table>"
        "<h2>Faults</h2><table><tr><th>fault</th><th>window s</th><th>what</th>"
        "<th>produce unavailable s</th><th>metadata unavailable s</th></tr>"
        f"{faults}</table>"
    )


def write_report(history: History, verdict: dict[str, Any], directory: Path) -> Path:
    """Draw ``report.png`` and write ``report.html`` (the picture and the verdict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line = timeline(history)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    top.plot(line.starts_s, line.acks_per_s, color="tab:blue", linewidth=1)
    top.set_ylabel("acknowledged sends/s")
    xs = [x for x, y in zip(line.starts_s, line.p99_latency_ms, strict=True) if y is not None]
    ys = [y for y in line.p99_latency_ms if y is not None]
    bottom.plot(xs, ys, color="tab:orange", linewidth=1)
    bottom.set_ylabel("p99 ack latency (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds into the run")
    for name, start, end in line.faults:
        for axis in (top, bottom):
            axis.axvspan(start, end, color="tab:red", alpha=0.15)
        if len(line.faults) <= 12:  # More names than that would only overlap.
            top.annotate(name, (start, 0), xytext=(2, 2), textcoords="offset points", fontsize=7)
    status = "valid" if verdict.get("valid") else "INVALID"
    kinds = ", ".join(sorted({name for name, _, _ in line.faults}))
    figure.suptitle(
        f"{verdict.get('scenario', 'chaos run')} (seed {verdict.get('seed')}): {status}"
        + (f"\nshaded: {len(line.faults)} faults ({kinds})" if line.faults else "")
    )
    figure.tight_layout()
    png = directory / "report.png"
    figure.savefig(png, dpi=100)
    plt.close(figure)
    encoded = base64.b64encode(png.read_bytes()).decode()
    page = directory / "report.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><title>raftka chaos report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "pre{background:#f4f4f4;padding:1em;overflow:auto}</style>"
        f"<h1>{html.escape(str(verdict.get('scenario')))}: {status}</h1>"
        f'<img alt="timeline" src="data:image/png;base64,{encoded}" width="1100">'
        f"{_figures_html(history, verdict)}"
        "<h2>Verdict and figures</h2>"
        f"<pre>{html.escape(json.dumps(verdict, indent=2, default=str))}</pre>"
    )
    return page
