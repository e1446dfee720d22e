"""The chaos report: binning is pure; the PNG and HTML are written."""

from __future__ import annotations

from chaos.history import History, Op
from chaos.report import timeline, write_report


def history() -> History:
    ops = [Op(0, "send", i * 0.01, i * 0.01 + 0.005, "ok", "t", 0, f"v{i}", i) for i in range(100)]
    ops.append(Op(2, "fault", 0.3, 0.6, "ok", "t", 0, fault="kill-partition-leader"))
    return History(ops)


def test_timeline_counts_acknowledgements_per_bin():
    line = timeline(history(), bin_s=0.25)
    assert len(line.starts_s) == 4
    assert sum(rate * 0.25 for rate in line.acks_per_s) == 100
    assert all(p is None or abs(p - 5.0) < 1e-6 for p in line.p99_latency_ms)
    assert line.faults == [("kill-partition-leader", 0.3, 0.6)]


def test_the_report_is_written(tmp_path):
    page = write_report(history(), {"scenario": "x", "seed": 1, "valid": True}, tmp_path)
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in page.read_text()
