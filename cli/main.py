"""The ``raftka`` command line: thin commands that parse, call ``client``/``LocalCluster``
and print what ``cli.render`` formats.

Every command that talks to a cluster takes ``--bootstrap host:port,...``
(or ``RAFTKA_BOOTSTRAP``); without it, it reads the local cluster's manifest
from ``--dir`` (default ``$RAFTKA_HOME``, else ``./.raftka/local-cluster``).
Every command has ``--json`` for scripts. Errors print one red line to
stderr and exit 1.

Tests inject fakes through the click context object: ``CliRunner().invoke(app,
args, obj=Deps(admin=...))``.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from cli import render
from cli.chaos_cmd import app as chaos_app
from cli.data import app as data_app
from cli.groups import app as group_app
from cli.localcluster import LocalCluster, LocalClusterError
from client.admin import Admin
from client.errors import RaftkaError
from quorum.config import ConfigError, NodeConfig

DEFAULT_CLUSTER_DIR = Path(".raftka") / "local-cluster"
DEMO_TOPIC = "demo"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Deps:
    """What commands reach outside the process through; tests replace these."""

    admin: Callable[[str], Any] = field(default=lambda bootstrap: Admin(bootstrap))
    local_cluster: Callable[[Path], Any] = field(default=LocalCluster)
    now_ms: Callable[[], int] = field(default=_now_ms)


def _deps(ctx: typer.Context) -> Deps:
    if not isinstance(ctx.obj, Deps):
        ctx.obj = Deps()
    return ctx.obj


app = typer.Typer(
    name="raftka",
    help="Operate a raftka cluster: Kafka's model with a Raft metadata quorum.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cluster_app = typer.Typer(help="A local cluster of real processes.", no_args_is_help=True)
controller_app = typer.Typer(help="Controller nodes (the metadata quorum).", no_args_is_help=True)
broker_app = typer.Typer(help="Broker nodes.", no_args_is_help=True)
quorum_app = typer.Typer(help="The metadata quorum.", no_args_is_help=True)
topic_app = typer.Typer(help="Topics.", no_args_is_help=True)
metadata_app = typer.Typer(help="The metadata log.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (figures in the README).", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(controller_app, name="controller")
app.add_typer(broker_app, name="broker")
app.add_typer(quorum_app, name="quorum")
app.add_typer(topic_app, name="topic")
app.add_typer(metadata_app, name="metadata")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app)  # produce, consume (cli/data.py)
app.add_typer(group_app, name="group")  # consumer groups (cli/groups.py)
app.add_typer(chaos_app, name="chaos")  # fault scenarios (chaos/)

DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Local cluster directory (default: $RAFTKA_HOME, else ./.raftka/local-cluster).",
        show_default=False,
    ),
]
BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        "-b",
        envvar="RAFTKA_BOOTSTRAP",
        help="Controller addresses, host:port,... (default: the local cluster's).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
StandInOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Register this many brokers that only heartbeat, and put the benchmark's "
        "replicas on them: the quorum measured without brokers creating logs (on a "
        "cluster started with --brokers 0). They shut down at the end; topics left "
        "behind stay without leaders.",
    ),
]


# -- plumbing ---------------------------------------------------------------


def _fail(message: str, code: int = 1) -> typer.Exit:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def _handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Known errors become one red line and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RaftkaError, LocalClusterError, ConfigError, OSError) as exc:
            raise _fail(str(exc)) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None

    return wrapper


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _out() -> Console:
    # Piped output is not cut to 80 columns: tables stay one row per line.
    width = None if sys.stdout.isatty() else 160
    return Console(highlight=False, width=width)


def _cluster_dir(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    home = os.environ.get("RAFTKA_HOME")
    return Path(home) if home else DEFAULT_CLUSTER_DIR


def _local_cluster(ctx: typer.Context, directory: Path | None) -> Any:
    return _deps(ctx).local_cluster(_cluster_dir(directory))


def _existing_cluster(ctx: typer.Context, directory: Path | None) -> Any:
    cluster = _local_cluster(ctx, directory)
    if not cluster.exists():
        raise LocalClusterError(
            f"no local cluster in {cluster.directory}: run 'raftka cluster up' "
            "or pass --bootstrap host:port"
        )
    return cluster


def _emit(as_json: bool, json_value: Callable[[], Any], table: Callable[[], Any]) -> None:
    """Print JSON for scripts, or the rendered table for people."""
    if as_json:
        _print_json(json_value())
    else:
        _out().print(table())


@contextmanager
def _admin(ctx: typer.Context, bootstrap: str | None, directory: Path | None) -> Iterator[Any]:
    if not bootstrap:
        bootstrap = _existing_cluster(ctx, directory).bootstrap
    with _deps(ctx).admin(bootstrap) as admin:
        yield admin


def _parse_configs(items: list[str]) -> dict[str, str]:
    configs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"{item!r} is not name=value", param_hint="--config")
        configs[name.strip()] = value.strip()
    return configs


# -- cluster ----------------------------------------------------------------


@cluster_app.command("up")
@_handles_errors
def cluster_up(
    ctx: typer.Context,
    directory: DirOpt = None,
    controllers: Annotated[int | None, typer.Option(help="Controllers (default 3).")] = None,
    brokers: Annotated[
        int | None, typer.Option(help="Brokers (default 3; 0 for a quorum alone).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait until ready.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Create a local cluster, or start the nodes of an existing one that are down;
    return once it is ready."""
    cluster = _local_cluster(ctx, directory)
    err = Console(stderr=True, highlight=False)
    if not cluster.exists():
        cluster.create(
            controllers=3 if controllers is None else controllers,
            brokers=3 if brokers is None else brokers,
        )
        if not as_json:
            err.print(f"created cluster {cluster.cluster_id} in {cluster.directory}")
    elif controllers is not None or brokers is not None:
        err.print("[yellow]note:[/] the cluster exists; --controllers/--brokers are ignored")
    launched = cluster.start()
    if not as_json and launched:
        err.print(f"started nodes {', '.join(map(str, launched))}")
    with err.status("waiting for the cluster to be ready") as spinner:
        cluster.wait_ready(timeout, on_progress=lambda reason: spinner.update(reason))
    _print_nodes(cluster.status(), as_json)


@cluster_app.command("down")
@_handles_errors
def cluster_down(
    ctx: typer.Context,
    directory: DirOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 15.0,
    kill: Annotated[bool, typer.Option("--kill", help="SIGKILL at once.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop every node of the local cluster (brokers first); data stays."""
    cluster = _local_cluster(ctx, directory)
    stopped = cluster.stop(timeout_s=timeout, kill=kill)
    _emit(
        as_json,
        lambda: {"stopped": stopped},
        lambda: f"stopped {len(stopped)} node(s) in {cluster.directory}",
    )


@cluster_app.command("status")
@_handles_errors
def cluster_status(ctx: typer.Context, directory: DirOpt = None, as_json: JsonOpt = False) -> None:
    """The local cluster's nodes and their processes."""
    _print_nodes(_local_cluster(ctx, directory).status(), as_json)


def _print_nodes(nodes: list[Any], as_json: bool) -> None:
    _emit(as_json, lambda: render.nodes_json(nodes), lambda: render.format_nodes(nodes))


@cluster_app.command("demo")
@_handles_errors
def cluster_demo(
    ctx: typer.Context,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    topic: Annotated[str, typer.Option(help="Topic to create.")] = DEMO_TOPIC,
    records: Annotated[
        int, typer.Option(min=0, help="Records to produce (acks=all) and read back.")
    ] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Show the cluster working: create a topic (3 partitions, 3 replicas) if absent,
    produce records to it with acks=all and read them back, then describe the topic
    (with each partition's offsets) and the quorum."""
    with _admin(ctx, bootstrap, directory) as admin:
        created = False
        brokers = [b for b in admin.describe_cluster().brokers if not b.fenced]
        if topic not in admin.list_topics():
            admin.create_topic(topic, 3, max(1, min(3, len(brokers))))
            created = True
        round_trip = _demo_round_trip(brokers, topic, records) if records else None
        described = admin.describe_topics([topic])
        logs = admin.describe_replica_logs() if records else None
        quorum = admin.describe_quorum()
    if as_json:
        _print_json(
            {
                "created": created,
                "round_trip": round_trip,
                "topic": render.topics_json(described, logs)[0],
                "quorum": render.quorum_json(quorum),
            }
        )
        return
    out = _out()
    out.print(f"{'created' if created else 'found'} topic [bold]{escape(topic)}[/]")
    if round_trip is not None:
        out.print(
            f"produced {round_trip['produced']} records with acks=all in "
            f"{round_trip['produce_ms']:.0f} ms, read {round_trip['consumed']} back in "
            f"{round_trip['consume_ms']:.0f} ms"
        )
    out.print(render.format_topics(described, logs))
    out.print(render.format_quorum(quorum, _deps(ctx).now_ms()))


def _demo_round_trip(brokers: list[Any], topic: str, records: int) -> dict[str, Any]:
    """Produce ``records`` keyed records with acks=all, then read exactly those back."""
    import time

    from client import Consumer, Producer, TopicPartition

    addresses = ",".join(b.address for b in brokers)
    with Consumer(addresses, auto_offset_reset="earliest") as consumer:
        partitions = [TopicPartition(topic, p) for p in sorted(_wait_partitions(consumer, topic))]
        consumer.assign(partitions)
        start = consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, start[tp])
        t0 = time.perf_counter()
        with Producer(addresses, acks="all") as producer:
            for i in range(records):
                producer.send(topic, f"demo record {i}".encode(), key=f"key-{i % 10}".encode())
            producer.flush(timeout=60)
        produce_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        consumed = 0
        deadline = time.monotonic() + 60
        while consumed < records and time.monotonic() < deadline:
            consumed += sum(len(batch) for batch in consumer.poll(timeout_ms=500).values())
        consume_ms = (time.perf_counter() - t0) * 1000
    if consumed != records:
        raise RuntimeError(f"produced {records} records but read {consumed} back")
    return {
        "produced": records,
        "consumed": consumed,
        "produce_ms": round(produce_ms, 1),
        "consume_ms": round(consume_ms, 1),
    }


def _wait_partitions(consumer: Any, topic: str, timeout_s: float = 30.0) -> set[int]:
    """The topic's partitions once the brokers know it (a new topic takes a moment)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        time.sleep(0.1)
    raise RuntimeError(f"the brokers do not know topic {topic} after {timeout_s:.0f} s")


# -- nodes ------------------------------------------------------------------

NodeConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="The node's TOML config.")]
NodeIdOpt = Annotated[int | None, typer.Option("--node-id", help="Override node.id.")]
OverrideOpt = Annotated[
    list[str] | None,
    typer.Option("--override", "-o", help="Override a config: name=value (repeatable)."),
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING...")]


def _load_node_config(
    role: str, path: Path, node_id: int | None, overrides: list[str] | None
) -> NodeConfig:
    values: dict[str, Any] = _parse_configs(overrides or [])
    if node_id is not None:
        values["node.id"] = node_id
    config = NodeConfig.load(path, overrides=values)
    if role not in config.roles:
        raise ConfigError(
            f"{path}: process.roles is {','.join(sorted(config.roles))}, without {role}"
        )
    return config


def _run_node(node_config: NodeConfig, log_level: str) -> None:
    """Run the node the config describes (controller, broker or both) until a signal."""
    from cli._foreground import DESCRIPTORS_PER_LOG, raise_open_files_limit, run_until_signalled

    roles = node_config.roles
    name = f"{'+'.join(sorted(roles))}-{node_config.node_id}"
    _setup_logging(log_level, name)
    before, after = raise_open_files_limit()
    if "broker" in roles:
        logging.getLogger("raftka.cli").info(
            "open files limit %d (was %d): room for about %d partition logs",
            after,
            before,
            after // DESCRIPTORS_PER_LOG,
        )
    node: Any
    if roles == {"controller"}:
        from quorum.node import ControllerNode

        node = ControllerNode(node_config)
        run_until_signalled(node, node.stop, name=name)
        return
    if roles == {"broker"}:
        from broker.node import BrokerNode

        node = BrokerNode(node_config)
    else:
        from cli._combined import CombinedNode

        node = CombinedNode(node_config)
    run_until_signalled(node, lambda: node.stop(controlled=True), name=name)


def _setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
    )


@controller_app.command("start")
@_handles_errors
def controller_start(
    config: NodeConfigOpt,
    node_id: NodeIdOpt = None,
    override: OverrideOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Run a controller in the foreground until SIGTERM/SIGINT (with the broker role
    too when process.roles says broker,controller)."""
    _run_node(_load_node_config("controller", config, node_id, override), log_level)


@broker_app.command("start")
@_handles_errors
def broker_start(
    config: NodeConfigOpt,
    node_id: NodeIdOpt = None,
    override: OverrideOpt = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Run a broker in the foreground until SIGTERM/SIGINT, then shut down in a
    controlled way (leaderships move away first)."""
    _run_node(_load_node_config("broker", config, node_id, override), log_level)


@broker_app.command("list")
@_handles_errors
def broker_list(
    ctx: typer.Context,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Registered brokers and whether they are fenced."""
    with _admin(ctx, bootstrap, directory) as admin:
        cluster = admin.describe_cluster()
    _emit(as_json, lambda: render.cluster_json(cluster), lambda: render.format_brokers(cluster))


# -- quorum -----------------------------------------------------------------


@quorum_app.command("status")
@_handles_errors
def quorum_status(
    ctx: typer.Context,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Leader, epoch, high watermark and each voter's and observer's lag."""
    with _admin(ctx, bootstrap, directory) as admin:
        quorum = admin.describe_quorum()
    _emit(
        as_json,
        lambda: render.quorum_json(quorum),
        lambda: render.format_quorum(quorum, _deps(ctx).now_ms()),
    )


# -- topics -----------------------------------------------------------------


@topic_app.command("create")
@_handles_errors
def topic_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Topic name.")],
    partitions: Annotated[
        int, typer.Option("--partitions", "-p", help="-1: the cluster default.")
    ] = -1,
    replication_factor: Annotated[
        int, typer.Option("--replication-factor", "-r", help="-1: the cluster default.")
    ] = -1,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Topic config name=value (repeatable)."),
    ] = None,
    validate_only: Annotated[bool, typer.Option("--validate-only")] = False,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a topic."""
    configs = _parse_configs(config or [])
    with _admin(ctx, bootstrap, directory) as admin:
        created = admin.create_topic(
            name, partitions, replication_factor, configs, validate_only=validate_only
        )
    if as_json:
        _print_json(
            {
                "name": created.name,
                "topic_id": created.topic_id,
                "num_partitions": created.num_partitions,
                "replication_factor": created.replication_factor,
                "validate_only": validate_only,
            }
        )
        return
    verb = "would create" if validate_only else "created"
    _out().print(
        f"{verb} topic [bold]{escape(created.name)}[/] "
        f"({_count(created.num_partitions, 'partition')}, "
        f"replication factor {created.replication_factor})"
    )


@topic_app.command("list")
@_handles_errors
def topic_list(
    ctx: typer.Context,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Topics with their partition counts and health."""
    with _admin(ctx, bootstrap, directory) as admin:
        topics = admin.describe_topics()
    _emit(as_json, lambda: render.topic_list_json(topics), lambda: render.format_topic_list(topics))


@topic_app.command("describe")
@_handles_errors
def topic_describe(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Topic (default: all).")] = None,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Partitions of a topic (or all): leader, epochs, replicas, ISR, and the leader's
    log start, log end and high watermark."""
    with _admin(ctx, bootstrap, directory) as admin:
        topics = admin.describe_topics([name] if name else None)
        logs = admin.describe_replica_logs()
    _emit(
        as_json,
        lambda: render.topics_json(topics, logs),
        lambda: render.format_topics(topics, logs),
    )


@topic_app.command("delete")
@_handles_errors
def topic_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Topic name.")],
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a topic."""
    with _admin(ctx, bootstrap, directory) as admin:
        admin.delete_topic(name)
    _emit(as_json, lambda: {"deleted": name}, lambda: f"deleted topic [bold]{escape(name)}[/]")


@topic_app.command("alter")
@_handles_errors
def topic_alter(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Topic name.")],
    partitions: Annotated[int, typer.Option("--partitions", "-p", help="New total count.")],
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Raise a topic's partition count."""
    with _admin(ctx, bootstrap, directory) as admin:
        admin.increase_partitions(name, partitions)
    _emit(
        as_json,
        lambda: {"name": name, "partitions": partitions},
        lambda: f"topic [bold]{escape(name)}[/] now has {_count(partitions, 'partition')}",
    )


@topic_app.command("elect-leaders")
@_handles_errors
def topic_elect_leaders(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Topic (default: every partition).")] = None,
    partition: Annotated[
        list[int] | None, typer.Option("--partition", "-p", help="Partition (repeatable).")
    ] = None,
    unclean: Annotated[bool, typer.Option("--unclean", help="Allow out-of-sync leaders.")] = False,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move leadership back to the preferred replicas (or elect unclean leaders)."""
    with _admin(ctx, bootstrap, directory) as admin:
        targets = None
        if name:
            wanted = partition or [p.partition for p in admin.describe_topic(name).partitions]
            targets = [(name, p) for p in wanted]
        results = admin.elect_leaders(targets, "unclean" if unclean else "preferred")
    _emit(
        as_json,
        lambda: render.results_json(results),
        lambda: render.format_results(results, "leader elections"),
    )


# -- metadata log -----------------------------------------------------------


@metadata_app.command("log")
@_handles_errors
def metadata_log(
    ctx: typer.Context,
    offset: Annotated[int, typer.Option(help="First offset.")] = 0,
    max_records: Annotated[int, typer.Option(help="Records at most.")] = 100,
    directory: DirOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Committed records of the metadata log."""
    with _admin(ctx, bootstrap, directory) as admin:
        entries = admin.read_metadata_log(offset, max_records)
    _emit(
        as_json,
        lambda: render.metadata_log_json(entries),
        lambda: render.format_metadata_log(entries),
    )


# -- bench ------------------------------------------------------------------


@contextmanager
def _progress(total: int | None, what: str, as_json: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (none with --json); yields the advance function."""
    if as_json:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _bench_bootstrap(ctx: typer.Context, bootstrap: str | None, directory: Path | None) -> str:
    return bootstrap or str(_existing_cluster(ctx, directory).bootstrap)


@bench_app.command("metadata")
@_handles_errors
def bench_metadata(
    ctx: typer.Context,
    requests: Annotated[int, typer.Option(min=1, help="CreateTopics requests to send.")] = 5000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 64,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per created topic.")] = 4,
    sequential: Annotated[int, typer.Option(min=0, help="Sequential requests timed first.")] = 200,
    duration: Annotated[
        float | None, typer.Option(help="Run for this many seconds instead of --requests.")
    ] = None,
    stand_in_brokers: StandInOpt = 0,
    bootstrap: BootstrapOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Committed metadata records per second and sequential write latency."""
    from cli.bench import run_metadata_bench

    address = _bench_bootstrap(ctx, bootstrap, directory)
    total = None if duration else requests
    with _progress(total, "metadata writes", as_json) as advance:
        result = run_metadata_bench(
            address,
            requests=requests,
            concurrency=concurrency,
            partitions_per_topic=partitions,
            sequential=sequential,
            duration_s=duration,
            stand_in_brokers=stand_in_brokers,
            progress=advance,
        )
    _emit(as_json, lambda: result.to_dict(), lambda: render.format_bench_metadata(result.to_dict()))


@bench_app.command("failover")
@_handles_errors
def bench_failover(
    ctx: typer.Context,
    runs: Annotated[
        int, typer.Option(min=1, help="How many times to kill the active controller.")
    ] = 10,
    stand_in_brokers: StandInOpt = 0,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Kill -9 the active controller of the local cluster N times; time each failover
    (kill to the next committed write through the client library)."""
    from cli.bench import run_failover_bench

    cluster = _existing_cluster(ctx, directory)
    with _progress(runs, "failovers", as_json) as advance:
        result = run_failover_bench(
            cluster, runs, stand_in_brokers=stand_in_brokers, progress=advance
        )
    _emit(as_json, lambda: result.summary(), lambda: render.format_bench_failover(result.summary()))


@bench_app.command("scale")
@_handles_errors
def bench_scale(
    ctx: typer.Context,
    topics: Annotated[int, typer.Option(min=1, help="Topics to create.")] = 1000,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions per topic.")] = 100,
    failovers: Annotated[int, typer.Option(min=0, help="Failovers timed at that scale.")] = 3,
    stand_in_brokers: StandInOpt = 0,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create topics x partitions on the local cluster; time a fresh broker's
    catch-up and controller failover at that scale."""
    from cli.bench import run_scale_bench

    cluster = _existing_cluster(ctx, directory)
    with _progress(topics, "topics", as_json) as advance:
        result = run_scale_bench(
            cluster,
            topics=topics,
            partitions_per_topic=partitions,
            failover_runs=failovers,
            stand_in_brokers=stand_in_brokers,
            progress=advance,
        )
    _emit(as_json, lambda: result.to_dict(), lambda: render.format_bench_scale(result.to_dict()))


def _brokers_of(bootstrap: str) -> str:
    from cli.bench_data import broker_bootstrap

    return broker_bootstrap(bootstrap)


@bench_app.command("produce")
@_handles_errors
def bench_produce(
    ctx: typer.Context,
    records: Annotated[int, typer.Option(min=1, help="Records to send.")] = 1_000_000,
    record_size: Annotated[int, typer.Option(min=0, help="Value bytes per record.")] = 100,
    acks: Annotated[str, typer.Option(help="all, 1 or 0.")] = "all",
    partitions: Annotated[int, typer.Option(min=1)] = 6,
    replication_factor: Annotated[int, typer.Option(min=1)] = 3,
    min_insync_replicas: Annotated[int, typer.Option(min=1)] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Bytes per partition batch.")] = 262144,
    linger_ms: Annotated[float, typer.Option(min=0)] = 5,
    compression: Annotated[str | None, typer.Option(help="gzip, snappy, lz4 or zstd.")] = None,
    topic: Annotated[str | None, typer.Option(help="Topic (default: a new one).")] = None,
    bootstrap: BootstrapOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records per second from one producer process (this one)."""
    from cli.bench_data import run_produce_bench

    address = _bench_bootstrap(ctx, bootstrap, directory)
    with _progress(records, "records", as_json) as advance:
        result = run_produce_bench(
            address,
            _brokers_of(address),
            topic=topic,
            records=records,
            record_size=record_size,
            partitions=partitions,
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
            acks=acks if acks == "all" else int(acks),
            batch_size=batch_size,
            linger_ms=linger_ms,
            compression=compression,
            progress=advance,
        )
    _emit(
        as_json, lambda: result, lambda: render.format_bench_figures("raftka bench produce", result)
    )


@bench_app.command("consume")
@_handles_errors
def bench_consume(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to read from the beginning.")],
    records: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    bootstrap: BootstrapOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records per second for one consumer reading every partition of TOPIC."""
    from cli.bench_data import run_consume_bench

    address = _bench_bootstrap(ctx, bootstrap, directory)
    with _progress(records, "records", as_json) as advance:
        result = run_consume_bench(_brokers_of(address), topic, records=records, progress=advance)
    _emit(
        as_json, lambda: result, lambda: render.format_bench_figures("raftka bench consume", result)
    )


@bench_app.command("latency")
@_handles_errors
def bench_latency(
    ctx: typer.Context,
    rate: Annotated[int, typer.Option(min=1, help="Records per second.")] = 10_000,
    seconds: Annotated[float, typer.Option(min=0.1, help="Measured seconds.")] = 10.0,
    warmup_seconds: Annotated[
        float,
        typer.Option(min=0, help="Seconds at the rate before measuring (not counted)."),
    ] = 1.0,
    acks: Annotated[str, typer.Option(help="all, 1 or 0.")] = "all",
    linger_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Producer linger: 0, as Kafka's end-to-end latency tool sets it "
            "(the producer's own default is 5).",
        ),
    ] = 0,
    bootstrap: BootstrapOpt = None,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """End-to-end latency (produce to consume) at a fixed rate; the consumer runs in
    another process."""
    from cli.bench_data import run_latency_bench

    address = _bench_bootstrap(ctx, bootstrap, directory)
    result = run_latency_bench(
        address,
        _brokers_of(address),
        rate=rate,
        seconds=seconds,
        warmup_s=warmup_seconds,
        acks=acks if acks == "all" else int(acks),
        linger_ms=linger_ms,
    )
    _emit(
        as_json, lambda: result, lambda: render.format_bench_figures("raftka bench latency", result)
    )


@bench_app.command("leader-kill")
@_handles_errors
def bench_leader_kill(
    ctx: typer.Context,
    runs: Annotated[int, typer.Option(min=1, help="Kills of partition 0's leader.")] = 5,
    rate: Annotated[int, typer.Option(min=1, help="Records per second sent.")] = 2000,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Kill -9 a partition leader of the local cluster under acks=all load, N times;
    time until produce succeeds again, then read back every acknowledged record."""
    from cli.bench_data import run_leader_kill_bench

    cluster = _existing_cluster(ctx, directory)
    with _progress(runs, "leader kills", as_json) as advance:
        result = run_leader_kill_bench(cluster, runs=runs, rate=rate, progress=advance)
    _emit(
        as_json,
        lambda: result,
        lambda: render.format_bench_figures("raftka bench leader-kill", result),
    )


@bench_app.command("memory")
@_handles_errors
def bench_memory(
    ctx: typer.Context,
    partitions: Annotated[int, typer.Option(min=1, help="Replicas per broker.")] = 1000,
    directory: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resident memory of each broker of the local cluster once it hosts N idle replicas."""
    from cli.bench_data import run_memory_bench

    cluster = _existing_cluster(ctx, directory)
    result = run_memory_bench(cluster, partitions=partitions)
    _emit(
        as_json, lambda: result, lambda: render.format_bench_figures("raftka bench memory", result)
    )


def main() -> None:
    try:
        app()
    finally:
        # Free what the command left in reference cycles (a client's finished gRPC
        # calls) while gRPC's threads still run. Left to interpreter exit, a call's
        # finaliser can wait for a lock that a daemon thread, frozen at exit, holds:
        # `raftka consume` hung after its last record in about 1 run in 40.
        gc.collect()


if __name__ == "__main__":
    main()
