"""``raftka produce`` and ``raftka consume``: the console producer and consumer.

Both talk to brokers, not controllers: ``--bootstrap-server host:port,...`` (or
``RAFTKA_BROKERS``) names one or more brokers, and without it the brokers of the local
cluster in ``--dir`` are used. ``produce`` reads one record per line from stdin or a file
and prints a summary; ``consume`` prints records as they arrive until ``--max-messages``,
``--timeout-ms`` of silence or Ctrl-C.

The commands only parse, call the client and print; ``format_record`` and
``format_produce_summary``/``produce_summary_json`` are pure functions. This module does
not import ``cli.main`` (which registers it), so it has its own small error wrapper.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from raftka.v1 import common_pb2
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.localcluster import LocalCluster, LocalClusterError
from client._brokers import Cluster, TopicPartition
from client._records import ConsumerRecord, RecordMetadata
from client.consumer import Consumer
from client.errors import ClientTimeoutError, RaftkaError
from client.producer import COMPRESSION_TYPES, Producer

app = typer.Typer()

# The same default as the other commands (cli.main): $RAFTKA_HOME, else this directory.
DEFAULT_CLUSTER_DIR = Path(".raftka") / "local-cluster"
FORMATS = ("text", "json", "kv")
TOPIC_WAIT_S = 3.0

BrokersOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-server",
        "--bootstrap",
        "-b",
        envvar="RAFTKA_BROKERS",
        help="Broker addresses, host:port,... (default: the local cluster's brokers).",
        show_default=False,
    ),
]
DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Local cluster directory (default: $RAFTKA_HOME, else ./.raftka/local-cluster).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known errors become one red line on stderr and exit 1, as in cli.main."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RaftkaError, LocalClusterError, OSError, ValueError) as exc:
            _error_line(str(exc))
            raise typer.Exit(1) from None

    return wrapper


def _error_line(message: str) -> None:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}")


def broker_bootstrap(ctx: typer.Context, bootstrap: str | None, directory: Path | None) -> str:
    """``--bootstrap-server`` if given, else the local cluster's broker addresses."""
    if bootstrap:
        return bootstrap
    if directory is None:
        home = os.environ.get("RAFTKA_HOME")
        directory = Path(home) if home else DEFAULT_CLUSTER_DIR
    # cli.main's Deps lets tests stand in for the local cluster; honour it when present.
    factory = getattr(ctx.obj, "local_cluster", LocalCluster)
    cluster = factory(directory)
    if not cluster.exists():
        raise LocalClusterError(
            f"no local cluster in {cluster.directory}: run 'raftka cluster up' "
            "or pass --bootstrap-server host:port"
        )
    brokers = [f"{n.host}:{n.rpc_port}" for n in cluster.nodes() if n.role == "broker"]
    if not brokers:
        raise LocalClusterError(f"the local cluster in {cluster.directory} has no brokers")
    return ",".join(brokers)


def check_topic(servers: str, topic: str) -> int:
    """The topic's partition count; a clear error when the brokers do not know it.

    The producer alone would wait ``max_block_ms`` for a topic that may yet appear, as
    Kafka's does; at a terminal, a typo should fail fast. A few seconds still cover a
    topic created a moment ago that the brokers' metadata has not caught up with.
    """
    cluster = Cluster(servers)
    try:
        return len(cluster.wait_for_topic(topic, TOPIC_WAIT_S))
    except ClientTimeoutError:
        if cluster.view.topic_errors.get(topic) == common_pb2.UNKNOWN_TOPIC_OR_PARTITION:
            raise ValueError(f"topic {topic!r} does not exist") from None
        raise  # The brokers could not be reached: the error says so.
    finally:
        cluster.close()


# -- produce ------------------------------------------------------------------


@dataclass
class ProduceSummary:
    """What a produce run delivered: per partition, records and the last offset."""

    topic: str
    records: int = 0
    failed: int = 0
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)
    first_error: str | None = None

    def delivered(self, metadata: RecordMetadata | None, error: BaseException | None) -> None:
        """The producer's callback (runs on its sender thread, one record at a time)."""
        if metadata is None:
            self.failed += 1
            self.first_error = self.first_error or str(error)
            return
        self.records += 1
        count, last = self.partitions.get(metadata.partition, (0, -1))
        self.partitions[metadata.partition] = (count + 1, max(last, metadata.offset))


def produce_summary_json(summary: ProduceSummary) -> dict[str, Any]:
    return {
        "topic": summary.topic,
        "records": summary.records,
        "failed": summary.failed,
        "error": summary.first_error,
        "partitions": [
            {"partition": p, "records": count, "last_offset": last}
            for p, (count, last) in sorted(summary.partitions.items())
        ],
    }


def format_produce_summary(summary: ProduceSummary) -> Table:
    table = Table(title=f"produced {summary.records} record(s) to {summary.topic}")
    table.add_column("partition", justify="right")
    table.add_column("records", justify="right")
    table.add_column("last offset", justify="right")
    for partition, (count, last) in sorted(summary.partitions.items()):
        table.add_row(str(partition), str(count), str(last) if last >= 0 else "-")
    return table


def parse_line(line: bytes, key_separator: bytes | None, number: int) -> tuple[bytes | None, bytes]:
    """A line (without its newline) -> (key, value); the key is None without a separator."""
    if key_separator is None:
        return None, line
    key, sep, value = line.partition(key_separator)
    if not sep:
        raise ValueError(f"line {number} has no key separator {key_separator.decode()!r}")
    return key, value


def read_lines(stream: BinaryIO) -> Iterator[bytes]:
    """Lines without their line ending (``\\n`` or ``\\r\\n``), as Kafka's console producer."""
    for raw in stream:
        yield raw.rstrip(b"\n").removesuffix(b"\r")


@app.command("produce")
@_handles_errors
def produce(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to write to.")],
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read lines from this file, not stdin.")
    ] = None,
    key_separator: Annotated[
        str | None,
        typer.Option(help="Split each line at the first SEP into key and value."),
    ] = None,
    acks: Annotated[str, typer.Option(help="all, 1 or 0.")] = "all",
    compression: Annotated[str, typer.Option(help="none, gzip, snappy, lz4 or zstd.")] = "none",
    linger_ms: Annotated[float, typer.Option(min=0, help="Batching delay.")] = 5.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for delivery at the end.")] = 60.0,
    bootstrap: BrokersOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write each line of stdin (or --file) to TOPIC as a record; print a summary."""
    if acks not in ("all", "-1", "1", "0"):
        raise typer.BadParameter("must be all, 1 or 0", param_hint="--acks")
    if compression not in COMPRESSION_TYPES:
        raise typer.BadParameter(
            "must be none, gzip, snappy, lz4 or zstd", param_hint="--compression"
        )
    separator = key_separator.encode() if key_separator else None
    summary = ProduceSummary(topic)
    servers = broker_bootstrap(ctx, bootstrap, directory)
    check_topic(servers, topic)
    with Producer(
        servers,
        acks=acks,
        compression_type=compression,
        linger_ms=linger_ms,
        max_block_ms=int(timeout * 1000),
    ) as producer:
        stream: BinaryIO
        with file.open("rb") if file else typer.get_binary_stream("stdin") as stream:
            try:
                for number, line in enumerate(read_lines(stream), 1):
                    key, value = parse_line(line, separator, number)
                    producer.send(topic, value, key=key, callback=summary.delivered)
            except KeyboardInterrupt:
                pass  # Deliver what was read, then summarise.
            finally:
                producer.flush(timeout)
    if as_json:
        typer.echo(json.dumps(produce_summary_json(summary), indent=2))
    else:
        Console(highlight=False).print(format_produce_summary(summary))
    if summary.failed:
        _error_line(f"{summary.failed} record(s) failed: {summary.first_error}")
        raise typer.Exit(1)


# -- consume ------------------------------------------------------------------


def _text(data: bytes | None) -> str:
    return "null" if data is None else data.decode("utf-8", "backslashreplace")


def format_record(record: ConsumerRecord, fmt: str, print_offsets: bool = False) -> str:
    """One output line: ``text`` (the value), ``kv`` (key TAB value) or ``json``.

    Bytes print as UTF-8 with undecodable bytes escaped; a null key or value as ``null``.
    ``print_offsets`` puts ``partition:offset`` and a TAB in front (json always has them).
    """
    if fmt == "json":
        return json.dumps(
            {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp": record.timestamp,
                "key": None if record.key is None else _text(record.key),
                "value": None if record.value is None else _text(record.value),
                "headers": [[name, _text(value)] for name, value in record.headers],
            }
        )
    line = _text(record.value) if fmt == "text" else f"{_text(record.key)}\t{_text(record.value)}"
    return f"{record.partition}:{record.offset}\t{line}" if print_offsets else line


def _assign(
    consumer: Consumer,
    topic: str,
    count: int,
    partitions: list[int] | None,
    offset: int | None,
) -> list[TopicPartition]:
    chosen = sorted(set(partitions)) if partitions else list(range(count))
    missing = [p for p in chosen if not 0 <= p < count]
    if missing:
        raise ValueError(f"topic {topic!r} has no partition {missing[0]} ({count} in all)")
    assigned = [TopicPartition(topic, p) for p in chosen]
    consumer.assign(assigned)
    if offset is not None:
        for tp in assigned:
            consumer.seek(tp, offset)
    return assigned


def consume_records(
    consumer: Consumer,
    *,
    max_messages: int | None,
    idle_timeout_ms: int | None,
) -> Iterable[list[ConsumerRecord]]:
    """Lists of records as polls bring them; stops at ``max_messages`` records or after
    ``idle_timeout_ms`` without any."""
    remaining = max_messages
    idle_since = time.monotonic()
    while remaining is None or remaining > 0:
        wait_ms = 500.0
        if idle_timeout_ms is not None:
            left_ms = idle_timeout_ms - (time.monotonic() - idle_since) * 1000
            if left_ms <= 0:
                return
            wait_ms = min(wait_ms, left_ms)
        fetched = consumer.poll(timeout_ms=wait_ms, max_records=remaining)
        if not fetched:
            continue
        idle_since = time.monotonic()
        records = [r for rs in fetched.values() for r in rs]
        if remaining is not None:
            records = records[:remaining]
            remaining -= len(records)
        yield records


@app.command("consume")
@_handles_errors
def consume(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the log start, not the end.")
    ] = False,
    partition: Annotated[
        list[int] | None,
        typer.Option("--partition", "-p", help="Read only this partition (repeatable)."),
    ] = None,
    offset: Annotated[
        int | None, typer.Option(min=0, help="Start every chosen partition at this offset.")
    ] = None,
    max_messages: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many records.")
    ] = None,
    timeout_ms: Annotated[
        int | None, typer.Option(min=0, help="Stop after this long without records.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or kv.")] = "text",
    print_offsets: Annotated[
        bool, typer.Option("--print-offsets", help="Prefix partition:offset.")
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            "-g",
            help="Read as group G: start at its committed offsets, commit what was printed.",
        ),
    ] = None,
    bootstrap: BrokersOpt = None,
    directory: DirOpt = None,
) -> None:
    """Print TOPIC's records as they arrive, until --max-messages, --timeout-ms idle or Ctrl-C.

    With --group, it reads as a member of the group (its share of the partitions, or the
    --partition ones), starts at the group's committed offsets (partitions without one
    start as --from-beginning says) and commits what it printed."""
    if fmt not in FORMATS:
        raise typer.BadParameter("must be text, json or kv", param_hint="--format")
    if offset is not None and from_beginning:
        raise typer.BadParameter("give --offset or --from-beginning, not both")
    servers = broker_bootstrap(ctx, bootstrap, directory)
    partitions = check_topic(servers, topic)
    count = 0
    out = typer.get_text_stream("stdout")
    if group is not None and offset is not None:
        raise typer.BadParameter("--offset does not go with --group (use group reset-offsets)")
    with Consumer(
        servers,
        auto_offset_reset="earliest" if from_beginning else "latest",
        group_id=group,
        enable_auto_commit=False,
    ) as consumer:
        if group is not None and not partition:
            # A member of the group: partitions come from its rebalances.
            consumer.subscribe([topic])
        else:
            _assign(consumer, topic, partitions, partition, offset)
        try:
            for records in consume_records(
                consumer, max_messages=max_messages, idle_timeout_ms=timeout_ms
            ):
                out.write("".join(format_record(r, fmt, print_offsets) + "\n" for r in records))
                out.flush()
                count += len(records)
                if group is not None:
                    # What was printed, and nothing after it, is committed.
                    printed: dict[TopicPartition, int] = {}
                    for r in records:
                        printed[TopicPartition(r.topic, r.partition)] = r.offset + 1
                    try:
                        consumer.commit(printed)
                    except RaftkaError as e:  # A rebalance took them: another member re-reads.
                        _error_line(f"commit skipped: {e}")
        except KeyboardInterrupt:
            pass
    typer.echo(f"Processed a total of {count} messages", err=True)
