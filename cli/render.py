"""Pure rendering for the CLI: plain data in, rich renderables or JSON-ready dicts out.

``format_*`` functions return rich objects for people; ``*_json`` functions
return lists and dicts of plain values for scripts. The JSON keys are a
stable interface: add keys, never rename or remove them. Nothing here
prints, reads the clock or talks to the network; the current time is an
argument where ages are shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cli.localcluster import NodeStatus
from client.admin import (
    ClusterInfo,
    LogEntry,
    PartitionInfo,
    QuorumInfo,
    ReplicaInfo,
    ReplicaLog,
    TopicInfo,
)
from client.errors import RaftkaError
from quorum.records import describe, kind, to_dict

_STATE_STYLE = {"running": "green", "paused": "yellow", "stopped": "red"}


def format_age(timestamp_ms: int, now_ms: int) -> str:
    """``'120 ms ago'``, ``'3.4 s ago'``; ``'-'`` when unknown."""
    if timestamp_ms < 0:
        return "-"
    age_ms = max(0, now_ms - timestamp_ms)
    if age_ms < 1000:
        return f"{age_ms} ms ago"
    if age_ms < 120_000:
        return f"{age_ms / 1000:.1f} s ago"
    return f"{age_ms // 60_000} min ago"


def format_time(timestamp_ms: int) -> str:
    """UTC wall-clock time with milliseconds; ``'-'`` when unknown."""
    if timestamp_ms < 0:
        return "-"
    moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{timestamp_ms % 1000:03d}"


def _ids(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids)


# -- local cluster nodes ----------------------------------------------------


def nodes_json(nodes: Iterable[NodeStatus]) -> list[dict[str, Any]]:
    return [
        {
            "id": n.id,
            "role": n.role,
            "pid": n.pid,
            "host": n.host,
            "rpc_port": n.rpc_port,
            "raft_port": n.raft_port,
            "state": n.state,
            "config": n.config,
            "log": n.log,
        }
        for n in nodes
    ]


def format_nodes(nodes: Iterable[NodeStatus], title: str = "local cluster") -> Table:
    nodes = list(nodes)
    table = Table(title=title)
    if nodes:
        table.caption = f"logs: {Path(nodes[0].log).parent.parent}/node-<id>/node.log"
    for column in ("id", "role", "state", "pid", "rpc", "raft"):
        table.add_column(column, justify="right" if column in ("id", "pid") else "left")
    for n in nodes:
        table.add_row(
            str(n.id),
            n.role,
            Text(n.state, style=_STATE_STYLE.get(n.state, "")),
            str(n.pid) if n.pid else "-",
            f"{n.host}:{n.rpc_port}",
            f"{n.host}:{n.raft_port}" if n.raft_port else "-",
        )
    return table


# -- quorum -----------------------------------------------------------------


def _replica_json(r: ReplicaInfo) -> dict[str, Any]:
    return {
        "id": r.replica_id,
        "log_end_offset": r.log_end_offset,
        "lag": r.lag,
        "last_fetch_timestamp_ms": r.last_fetch_timestamp_ms,
        "last_caught_up_timestamp_ms": r.last_caught_up_timestamp_ms,
        "host": r.host,
        "port": r.port,
    }


def quorum_json(quorum: QuorumInfo) -> dict[str, Any]:
    return {
        "cluster_id": quorum.cluster_id,
        "leader_id": quorum.leader_id,
        "leader_epoch": quorum.leader_epoch,
        "high_watermark": quorum.high_watermark,
        "log_start_offset": quorum.log_start_offset,
        "voters": [_replica_json(r) for r in quorum.voters],
        "observers": [_replica_json(r) for r in quorum.observers],
    }


def format_quorum(quorum: QuorumInfo, now_ms: int) -> Group:
    """A summary (as ``kafka-metadata-quorum describe --status``) and the
    replication table (as ``--replication``)."""
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    leader = str(quorum.leader_id) if quorum.leader_id >= 0 else "none"
    for name, value in (
        ("ClusterId", quorum.cluster_id),
        ("LeaderId", leader),
        ("LeaderEpoch", str(quorum.leader_epoch)),
        ("HighWatermark", str(quorum.high_watermark)),
        ("LogStartOffset", str(quorum.log_start_offset)),
        ("CurrentVoters", _ids([r.replica_id for r in quorum.voters])),
        ("CurrentObservers", _ids([r.replica_id for r in quorum.observers])),
    ):
        summary.add_row(name, value)
    table = Table(title="metadata log replication")
    for column in ("id", "status", "log end offset", "lag", "last fetch", "last caught up"):
        table.add_column(
            column, justify="right" if column in ("id", "log end offset", "lag") else "left"
        )
    rows = [(r, "Voter") for r in quorum.voters] + [(r, "Observer") for r in quorum.observers]
    for replica, status in rows:
        if replica.replica_id == quorum.leader_id:
            status = "Leader"
        table.add_row(
            str(replica.replica_id),
            Text(status, style="bold green" if status == "Leader" else ""),
            str(replica.log_end_offset),
            Text(str(replica.lag), style="yellow" if replica.lag > 0 else ""),
            format_age(replica.last_fetch_timestamp_ms, now_ms),
            format_age(replica.last_caught_up_timestamp_ms, now_ms),
        )
    return Group(summary, table)


# -- brokers ----------------------------------------------------------------


def _broker_state(fenced: bool, in_controlled_shutdown: bool) -> str:
    """A broker in controlled shutdown is shutting down until it is fenced; the flag
    stays set until it registers again, so a broker that shut down is fenced."""
    if fenced:
        return "fenced"
    return "shutting_down" if in_controlled_shutdown else "unfenced"


def cluster_json(cluster: ClusterInfo) -> dict[str, Any]:
    return {
        "cluster_id": cluster.cluster_id,
        "controller_id": cluster.controller_id,
        "controller_epoch": cluster.controller_epoch,
        "metadata_offset": cluster.metadata_offset,
        "brokers": [
            {
                "id": b.broker_id,
                "broker_epoch": b.broker_epoch,
                "incarnation_id": b.incarnation_id,
                "listeners": [
                    {"name": e.name, "host": e.host, "port": e.port} for e in b.listeners
                ],
                "rack": b.rack,
                "fenced": b.fenced,
                "in_controlled_shutdown": b.in_controlled_shutdown,
                "state": _broker_state(b.fenced, b.in_controlled_shutdown),
                "leader_count": b.leader_count,
                "isr_count": b.isr_count,
            }
            for b in cluster.brokers
        ],
    }


def format_brokers(cluster: ClusterInfo) -> Table:
    table = Table(
        title=f"brokers of cluster {cluster.cluster_id} "
        f"(active controller {cluster.controller_id}, epoch {cluster.controller_epoch})"
    )
    numeric = ("id", "broker epoch", "leads", "in ISRs")
    for column in ("id", "address", "rack", "state", "broker epoch", "leads", "in ISRs"):
        table.add_column(column, justify="right" if column in numeric else "left")
    style = {"unfenced": "green", "fenced": "red", "shutting_down": "yellow"}
    for b in cluster.brokers:
        state = _broker_state(b.fenced, b.in_controlled_shutdown)
        table.add_row(
            str(b.broker_id),
            b.address or "-",
            b.rack or "-",
            Text(state, style=style[state]),
            str(b.broker_epoch),
            str(b.leader_count),
            str(b.isr_count),
        )
    return table


# -- topics -----------------------------------------------------------------


def _leader_log(
    logs: Mapping[tuple[str, int], Sequence[ReplicaLog]] | None, topic: str, p: PartitionInfo
) -> ReplicaLog | None:
    if not logs:
        return None
    return next((r for r in logs.get((topic, p.partition), ()) if r.broker_id == p.leader), None)


def topics_json(
    topics: Iterable[TopicInfo],
    logs: Mapping[tuple[str, int], Sequence[ReplicaLog]] | None = None,
) -> list[dict[str, Any]]:
    out = []
    for t in topics:
        partitions = []
        for p in t.partitions:
            row: dict[str, Any] = {
                "partition": p.partition,
                "leader": p.leader,
                "leader_epoch": p.leader_epoch,
                "partition_epoch": p.partition_epoch,
                "replicas": list(p.replicas),
                "isr": list(p.isr),
            }
            if logs is not None:
                leader_log = _leader_log(logs, t.name, p)
                row["log_start_offset"] = (
                    None if leader_log is None else leader_log.log_start_offset
                )
                row["log_end_offset"] = None if leader_log is None else leader_log.log_end_offset
                row["high_watermark"] = None if leader_log is None else leader_log.high_watermark
                row["replica_logs"] = [
                    {
                        "broker_id": r.broker_id,
                        "role": r.role,
                        "log_start_offset": r.log_start_offset,
                        "log_end_offset": r.log_end_offset,
                        "high_watermark": r.high_watermark,
                        "size_bytes": r.size_bytes,
                    }
                    for r in logs.get((t.name, p.partition), ())
                ]
            partitions.append(row)
        out.append(
            {
                "name": t.name,
                "topic_id": t.topic_id,
                "configs": dict(sorted(t.configs.items())),
                "partitions": partitions,
            }
        )
    return out


def topic_list_json(topics: Iterable[TopicInfo]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "topic_id": t.topic_id,
            "partitions": len(t.partitions),
            "replication_factor": t.replication_factor,
            "under_replicated_partitions": sum(p.under_replicated for p in t.partitions),
            "offline_partitions": sum(p.offline for p in t.partitions),
        }
        for t in topics
    ]


def format_topic_list(topics: Iterable[TopicInfo]) -> Table:
    table = Table(title="topics")
    table.add_column("name")
    for column in ("partitions", "replication factor", "under-replicated", "offline"):
        table.add_column(column, justify="right")
    for row in topic_list_json(topics):
        under, offline = row["under_replicated_partitions"], row["offline_partitions"]
        table.add_row(
            row["name"],
            str(row["partitions"]),
            str(row["replication_factor"]),
            Text(str(under), style="yellow" if under else ""),
            Text(str(offline), style="red" if offline else ""),
        )
    return table


def format_topics(
    topics: Iterable[TopicInfo],
    logs: Mapping[tuple[str, int], Sequence[ReplicaLog]] | None = None,
) -> Table:
    """One row per partition, as ``kafka-topics --describe``, with the leader's log
    start, log end and high watermark when ``logs`` are given."""
    table = Table(title="topic partitions")
    table.add_column("topic")
    columns = ["partition", "leader", "leader epoch", "replicas", "isr"]
    if logs is not None:
        columns += ["log start", "log end", "high watermark"]
    for column in [*columns, "status"]:
        table.add_column(column, justify="right" if column != "status" else "left")
    for t in topics:
        for p in t.partitions:
            if p.offline:
                status = Text("offline", style="bold red")
            elif p.under_replicated:
                status = Text("under-replicated", style="yellow")
            else:
                status = Text("ok", style="green")
            cells = [
                t.name,
                str(p.partition),
                str(p.leader) if p.leader >= 0 else "none",
                str(p.leader_epoch),
                _ids(p.replicas),
                _ids(p.isr),
            ]
            if logs is not None:
                leader_log = _leader_log(logs, t.name, p)
                if leader_log is None:
                    cells += ["?", "?", "?"]
                else:
                    cells += [
                        str(leader_log.log_start_offset),
                        str(leader_log.log_end_offset),
                        str(leader_log.high_watermark),
                    ]
            table.add_row(*cells, status)
    return table


def results_json(results: Mapping[Any, RaftkaError | None]) -> list[dict[str, Any]]:
    """Per-item outcomes of a batch call; keys are names or (topic, partition)."""
    rows = []
    for key, error in results.items():
        row: dict[str, Any]
        if isinstance(key, tuple):
            row = {"topic": key[0], "partition": key[1]}
        else:
            row = {"name": key}
        row["error"] = None if error is None else error.code_name
        row["message"] = "" if error is None else error.message
        rows.append(row)
    return rows


def format_results(results: Mapping[Any, RaftkaError | None], title: str) -> Table:
    table = Table(title=title)
    table.add_column("item")
    table.add_column("result")
    for row in results_json(results):
        item = row.get("name") or f"{row['topic']}-{row['partition']}"
        if row["error"] is None:
            table.add_row(item, Text("ok", style="green"))
        else:
            table.add_row(item, Text(f"{row['error']}: {row['message']}".rstrip(": "), style="red"))
    return table


# -- metadata log -----------------------------------------------------------


def metadata_log_json(entries: Iterable[LogEntry]) -> list[dict[str, Any]]:
    return [
        {
            "offset": e.offset,
            "controller_epoch": e.controller_epoch,
            "append_time_ms": e.append_time_ms,
            "type": kind(e.record),
            "record": to_dict(e.record),
        }
        for e in entries
    ]


def format_metadata_log(entries: Iterable[LogEntry]) -> Table:
    table = Table(title="metadata log")
    table.add_column("offset", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("append time (UTC)")
    table.add_column("record", overflow="fold")
    for e in entries:
        table.add_row(
            str(e.offset),
            str(e.controller_epoch),
            format_time(e.append_time_ms),
            describe(e.record),
        )
    return table


# -- benchmarks ----------------------------------------------------------------


def _figures(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_bench_metadata(result: dict[str, Any]) -> Table:
    latency = result["sequential_latency_ms"]
    changes = result["leader_epoch_end"] - result["leader_epoch_start"]
    return _figures(
        "raftka bench metadata",
        [
            ("committed records/s", f"{result['records_per_s']:,.0f}"),
            ("requests/s", f"{result['requests_per_s']:,.0f}"),
            ("records", f"{result['records']:,}"),
            ("seconds", f"{result['seconds']:.2f}"),
            ("concurrency", str(result["concurrency"])),
            ("partitions per topic", str(result["partitions_per_topic"])),
            ("sequential p50 ms", _ms(latency["p50"])),
            ("sequential p99 ms", _ms(latency["p99"])),
            ("errors", str(result["errors"])),
            ("leader epoch changes", str(changes)),
        ],
    )


def format_bench_failover(summary: dict[str, Any]) -> Table:
    rows = [
        (f"run {i + 1} (killed {k})", f"{s:.3f} s")
        for i, (s, k) in enumerate(zip(summary["failover_s"], summary["killed"], strict=True))
    ]
    if summary["runs"]:
        rows += [("median", f"{summary['median_s']:.3f} s"), ("max", f"{summary['max_s']:.3f} s")]
    return _figures("raftka bench failover", rows)


def format_bench_scale(result: dict[str, Any]) -> Table:
    median = result["failover_median_s"]
    return _figures(
        "raftka bench scale",
        [
            ("topics", f"{result['topics']:,}"),
            ("partitions", f"{result['partitions']:,}"),
            ("create time", f"{result['create_s']:.1f} s"),
            ("metadata records", f"{result['metadata_records']:,}"),
            (
                "brokers done with it",
                "-"
                if result["brokers_settled_s"] is None
                else f"{result['brokers_settled_s']:.1f} s after the last create",
            ),
            ("fresh follower catch-up", f"{result['fresh_follower_catch_up_s']:.2f} s"),
            ("caught up from a snapshot", "yes" if result["snapshot_loaded"] else "no"),
            ("failover", ", ".join(f"{s:.3f}" for s in result["failover_s"]) + " s"),
            ("failover median", "-" if median is None else f"{median:.3f} s"),
            (
                "a broker killed: led nothing after",
                _seconds(result.get("broker_moved_s")),
            ),
            (
                "restarted: unfenced after",
                _seconds(result.get("broker_rejoined_s")),
            ),
        ],
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def format_bench_figures(title: str, result: dict[str, Any]) -> Table:
    """Any bench result as a two-column table of its figures (lists and maps inline)."""

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}".rstrip("0").rstrip(".")
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        if isinstance(value, dict):
            return ", ".join(f"{k}: {show(v)}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(show(v) for v in value)
        return "-" if value is None else str(value)

    return _figures(title, [(key.replace("_", " "), show(value)) for key, value in result.items()])
