"""``raftka group list|describe|delete|reset-offsets``: consumer groups' committed offsets.

As ``kafka-consumer-groups``: describe shows per partition the committed offset, the
log end offset (the high watermark a consumer can reach) and the lag; reset-offsets
moves a group's committed offsets to the earliest, the latest, an offset, a time, or
by a shift, printing the plan, and writes it unless ``--dry-run``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from raftka.v1 import broker_pb2
from rich.console import Console
from rich.table import Table

from cli.data import BrokersOpt, DirOpt, _handles_errors, broker_bootstrap, check_topic
from client._brokers import Cluster, TopicPartition
from client._consumer_protocol import SchemaError, decode_assignment
from client.consumer import Consumer
from client.groups import GroupClient, list_groups

app = typer.Typer(help="Consumer groups: committed offsets, lag, resets.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _print(as_json: bool, data: Any, table: Table) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        Console().print(table)


def _lag_rows(servers: str, group: str) -> list[dict[str, Any]]:
    with Consumer(servers, group_id=group, enable_auto_commit=False) as consumer:
        assert consumer._group is not None
        committed = consumer._group.fetch()
        ends = consumer.end_offsets(sorted(committed)) if committed else {}
    rows = []
    for tp, value in sorted(committed.items()):
        end = ends.get(tp, -1)
        rows.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "committed_offset": value.offset,
                "log_end_offset": end,
                "lag": max(end - value.offset, 0) if end >= 0 else None,
                "metadata": value.metadata,
            }
        )
    return rows


@app.command("list")
@_handles_errors
def group_list(
    ctx: typer.Context,
    bootstrap: BrokersOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every group that has committed offsets."""
    servers = broker_bootstrap(ctx, bootstrap, directory)
    cluster = Cluster(servers)
    try:
        groups = list_groups(cluster)
    finally:
        cluster.close()
    table = Table(title="consumer groups")
    table.add_column("group")
    table.add_column("state")
    for name, state in groups:
        table.add_row(name, state)
    _print(as_json, [{"group": n, "state": s} for n, s in groups], table)


@app.command("describe")
@_handles_errors
def group_describe(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="Group id.")],
    bootstrap: BrokersOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Committed offset, log end offset and lag of every partition the group committed."""
    servers = broker_bootstrap(ctx, bootstrap, directory)
    rows = _lag_rows(servers, group)
    members = _members(servers, group)
    table = Table(title=f"group {group} ({members['state']}, generation {members['generation']})")
    for column in ("topic", "partition", "committed", "log end", "lag"):
        table.add_column(column, justify="left" if column == "topic" else "right")
    for row in rows:
        table.add_row(
            row["topic"],
            str(row["partition"]),
            str(row["committed_offset"]),
            str(row["log_end_offset"]),
            "-" if row["lag"] is None else str(row["lag"]),
        )
    if not as_json and members["members"]:
        Console().print(table)
        member_table = Table(title=f"members (protocol {members['protocol']})")
        for column in ("member", "instance", "client", "partitions"):
            member_table.add_column(column)
        for m in members["members"]:
            member_table.add_row(
                m["member_id"],
                m["group_instance_id"] or "-",
                m["client_id"],
                ", ".join(f"{t}-{p}" for t, p in m["partitions"]) or "-",
            )
        Console().print(member_table)
        return
    _print(as_json, {"group": group, **members, "offsets": rows}, table)


def _members(servers: str, group: str) -> dict[str, Any]:
    """State, generation, protocol and members with their partitions (DescribeGroups)."""
    cluster = Cluster(servers)
    try:
        client = GroupClient(cluster, group)
        answer = client.call("DescribeGroups", broker_pb2.DescribeGroupsRequest(group_ids=[group]))
    finally:
        cluster.close()
    assert isinstance(answer, broker_pb2.DescribeGroupsResponse)
    described = answer.groups[0]
    members = []
    for m in described.members:
        try:
            assignment = decode_assignment(m.member_assignment) if m.member_assignment else None
        except SchemaError:
            assignment = None
        partitions = (
            sorted((tp.topic, tp.partition) for tp in assignment.partitions) if assignment else []
        )
        members.append(
            {
                "member_id": m.member_id,
                "group_instance_id": m.group_instance_id or None,
                "client_id": m.client_id,
                "partitions": partitions,
            }
        )
    return {
        "state": described.state,
        "generation": described.generation_id,
        "protocol": described.protocol_name,
        "members": members,
    }


@app.command("delete")
@_handles_errors
def group_delete(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="Group id.")],
    bootstrap: BrokersOpt = None,
    directory: DirOpt = None,
) -> None:
    """Delete a group's committed offsets."""
    servers = broker_bootstrap(ctx, bootstrap, directory)
    cluster = Cluster(servers)
    try:
        GroupClient(cluster, group).delete()
    finally:
        cluster.close()
    typer.echo(f"deleted group {group}")


@app.command("reset-offsets")
@_handles_errors
def group_reset_offsets(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="Group id.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic whose offsets to reset.")],
    partition: Annotated[
        list[int] | None, typer.Option("--partition", "-p", help="Only this partition.")
    ] = None,
    to_earliest: Annotated[bool, typer.Option("--to-earliest")] = False,
    to_latest: Annotated[bool, typer.Option("--to-latest")] = False,
    to_offset: Annotated[int | None, typer.Option("--to-offset", min=0)] = None,
    to_datetime: Annotated[
        str | None, typer.Option("--to-datetime", help="ISO 8601, e.g. 2026-11-22T10:00:00")
    ] = None,
    shift_by: Annotated[int | None, typer.Option("--shift-by")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan only.")] = False,
    bootstrap: BrokersOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the group's committed offsets on TOPIC (exactly one --to-... or --shift-by)."""
    chosen = [
        to_earliest,
        to_latest,
        to_offset is not None,
        to_datetime is not None,
        shift_by is not None,
    ]
    if sum(chosen) != 1:
        raise typer.BadParameter(
            "give exactly one of --to-earliest, --to-latest, --to-offset, --to-datetime, --shift-by"
        )
    servers = broker_bootstrap(ctx, bootstrap, directory)
    count = check_topic(servers, topic)
    wanted = sorted(set(partition)) if partition else list(range(count))
    tps = [TopicPartition(topic, p) for p in wanted if 0 <= p < count]
    with Consumer(servers, group_id=group, enable_auto_commit=False) as consumer:
        assert consumer._group is not None
        starts = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
        current = consumer._group.fetch(tps)
        plan: dict[TopicPartition, int] = {}
        if to_datetime is not None:
            stamp = int(datetime.fromisoformat(to_datetime).timestamp() * 1000)
            found = consumer.offsets_for_times({tp: stamp for tp in tps})
        for tp in tps:
            if to_earliest:
                target = starts[tp]
            elif to_latest:
                target = ends[tp]
            elif to_offset is not None:
                target = to_offset
            elif to_datetime is not None:
                hit = found.get(tp)
                target = ends[tp] if hit is None else hit.offset
            else:
                base = current[tp].offset if tp in current else ends[tp]
                target = base + (shift_by or 0)
            plan[tp] = min(max(target, starts[tp]), ends[tp])
        if not dry_run:
            consumer.commit(plan)
    rows: list[dict[str, Any]] = [
        {
            "topic": tp.topic,
            "partition": tp.partition,
            "previous_offset": current[tp].offset if tp in current else None,
            "new_offset": offset,
        }
        for tp, offset in sorted(plan.items())
    ]
    table = Table(title=f"group {group}: {'plan (dry run)' if dry_run else 'offsets reset'}")
    for column in ("topic", "partition", "previous", "new"):
        table.add_column(column, justify="left" if column == "topic" else "right")
    for row in rows:
        previous = row["previous_offset"]
        table.add_row(
            row["topic"],
            str(row["partition"]),
            "-" if previous is None else str(previous),
            str(row["new_offset"]),
        )
    _print(as_json, {"group": group, "dry_run": dry_run, "offsets": rows}, table)
