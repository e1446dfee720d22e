"""Node configuration: one TOML file per node, overridable by flags and environment.

Names are Kafka's where the meaning is the same. TOML dotted keys
(``node.id = 1``) read as the flat Kafka property names. Precedence, lowest
first: defaults, the file, ``RAFTKA_<NAME>`` environment variables (dots and
dashes become underscores, e.g. ``RAFTKA_BROKER_SESSION_TIMEOUT_MS``), flags.

Every default is in ``DEFAULTS`` below with the reason for its value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or value is invalid."""


# name -> (default, meaning)
DEFAULTS: dict[str, tuple[Any, str]] = {
    "node.id": (None, "this node's id, unique across controllers and brokers"),
    "process.roles": ("broker", "'controller', 'broker' or 'broker,controller'"),
    "cluster.id": ("", "cluster id; brokers of another cluster are refused"),
    "controller.quorum.voters": (
        "",
        "the voters, 'id@host:raft_port:rpc_port,...' (3 or 5 for a quorum that survives failures)",
    ),
    "controller.quorum.password": (
        "",
        "shared secret of the Raft port: every Raft message is encrypted and authenticated",
    ),
    "metadata.log.dir": ("", "a controller's directory for its Raft journal and snapshot"),
    "log.dirs": ("", "where a broker keeps partition data (comma-separated)"),
    "listeners": ("", "the broker's gRPC listener, 'host:port'"),
    "replication.listener": (
        "",
        "the broker's replication listener, 'host:port' (port 0: any free one): followers "
        "fetch from this broker over plain TCP there, which is faster than gRPC; empty: "
        "they fetch over the gRPC listener. The host is both bound and advertised, so it must "
        "be an address other brokers can dial, not a wildcard "
        "(raftka's own, not Kafka's)",
    ),
    "network.dial.overrides": (
        "",
        "addresses this node dials in place of other nodes' own, 'host:port=host:port,...': "
        "for a proxy or NAT between nodes (the chaos suite routes every link through its "
        "proxies this way); identities stay the nodes' own addresses (raftka's own, not Kafka's)",
    ),
    "broker.rack": ("", "rack of the broker, used to spread replicas"),
    "broker.session.timeout.ms": (
        9000,
        "a broker that has not heartbeated for this long is fenced (Kafka's default)",
    ),
    "broker.heartbeat.interval.ms": (2000, "how often a broker heartbeats (Kafka's default)"),
    "broker.connection.loss.grace.ms": (
        500,
        "a broker whose metadata stream drops (its process died) is fenced after this long "
        "unless it reconnects; -1 waits for the session timeout (raftka's own, not Kafka's)",
    ),
    "controller.election.timeout.min.ms": (
        300,
        "Raft election timeout, lower bound; low enough for sub-second failover",
    ),
    "controller.election.timeout.max.ms": (
        600,
        "Raft election timeout, upper bound; the spread avoids split votes",
    ),
    "controller.heartbeat.interval.ms": (
        50,
        "Raft leader heartbeat; must stay under a third of the minimum election timeout",
    ),
    "controller.leader.fallback.ms": (
        250,
        "a Raft leader that hears from no majority for this long steps down (pysyncobj's 30 s "
        "default would let an isolated controller believe it leads for half a minute)",
    ),
    "controller.request.timeout.ms": (5000, "how long a metadata write may wait for commit"),
    "controller.batch.max.records": (
        2000,
        "records per Raft entry at most; requests queued together share one entry",
    ),
    "controller.max.records.per.request": (
        20000,
        "a request that would write more metadata records is refused (about 100 ms of replay "
        "on every node; more would hold Raft past an election timeout)",
    ),
    "controller.transition.slice.partitions": (
        1000,
        "a broker's fencing, shutdown, registration or unfencing changes at most this many "
        "partitions in its own batch; the rest follow in slices of this size, one per tick",
    ),
    "metadata.log.tail.records": (
        50000,
        "committed records kept for followers; one further behind gets a snapshot first",
    ),
    "metadata.log.snapshot.min.entries": (
        20000,
        "Raft entries between snapshots of the controller state",
    ),
    "metadata.log.fsync": (
        True,
        "flush the Raft journal to disk before a write is acknowledged (see README: durability)",
    ),
    "num.partitions": (1, "partitions of a topic created without a count"),
    "default.replication.factor": (1, "replication factor of a topic created without one"),
    "min.insync.replicas": (
        1,
        "cluster default for topics (enforced by brokers once produce with acks=all lands)",
    ),
    "producer.id.block.size": (1000, "producer ids handed to a broker at a time"),
    # Broker data plane. Names and defaults are Kafka's unless said otherwise.
    "message.max.bytes": (1048588, "largest record batch a producer may send"),
    "log.segment.bytes": (1073741824, "a segment rolls before it would grow past this size"),
    "log.roll.ms": (604800000, "a segment rolls once it is this old (7 days)"),
    "log.retention.ms": (604800000, "segments older than this are deleted (7 days); -1: never"),
    "log.retention.bytes": (-1, "a partition's log is trimmed to this size; -1: no limit"),
    "log.retention.check.interval.ms": (
        60000,
        "how often retention and compaction run (Kafka: 5 minutes)",
    ),
    "log.flush.interval.messages": (
        0,
        "fsync a partition after this many records; 0: leave it to the OS (Kafka's default: "
        "durability comes from replication, see README)",
    ),
    "log.flush.interval.ms": (0, "fsync a partition this often; 0: never on a timer"),
    "log.cleanup.policy": ("delete", "delete or compact, for topics that do not say"),
    "log.cleaner.delete.retention.ms": (86400000, "tombstones survive compaction this long"),
    "log.message.timestamp.type": ("CreateTime", "CreateTime or LogAppendTime"),
    "replica.lag.time.max.ms": (
        30000,
        "a follower that has not caught up for this long leaves the ISR",
    ),
    "replica.fetch.max.bytes": (1048576, "bytes per partition in a follower's fetch"),
    "replica.fetch.response.max.bytes": (10485760, "bytes in a follower's fetch answer"),
    "replica.fetch.wait.max.ms": (500, "how long a follower's fetch waits for new data"),
    "replica.fetch.backoff.ms": (100, "pause after a failed follower fetch"),
    "replica.high.watermark.checkpoint.interval.ms": (
        5000,
        "how often high watermarks are written to replication-offset-checkpoint",
    ),
    "unclean.leader.election.enable": (False, "elect a replica outside the ISR as last resort"),
    "offsets.topic.num.partitions": (
        50,
        "partitions of __consumer_offsets, created on first use (fixed afterwards)",
    ),
    "offsets.topic.replication.factor": (3, "replicas of __consumer_offsets (at most the brokers)"),
    "offsets.topic.segment.bytes": (104857600, "segment size of __consumer_offsets"),
    "offsets.retention.minutes": (
        10080,
        "committed offsets of a group without members expire this long after its last commit",
    ),
    "offsets.retention.check.interval.ms": (600000, "how often expired offsets are looked for"),
    "group.initial.rebalance.delay.ms": (
        3000,
        "how long a new group waits for more members before its first rebalance",
    ),
    "group.min.session.timeout.ms": (6000, "the shortest session a group member may ask for"),
    "group.max.session.timeout.ms": (1800000, "the longest session a group member may ask for"),
    "group.max.size": (0, "members per group at most; 0: no limit"),
    "num.rpc.threads": (
        128,
        "threads serving a broker's gRPC requests (a long poll or an open stream holds one)",
    ),
    "max.client.streams": (
        64,
        "client streams (ProduceStream, a consumer's FetchStream) served at once; past it "
        "a client uses unary calls (num.rpc.threads - 32 at most: threads for the rest)",
    ),
}

_INT_KEYS = {k for k, (v, _) in DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)}
_BOOL_KEYS = {k for k, (v, _) in DEFAULTS.items() if isinstance(v, bool)}
_INT_KEYS.add("node.id")


@dataclass(frozen=True, slots=True)
class Voter:
    node_id: int
    host: str
    raft_port: int
    rpc_port: int

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def rpc_address(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    def __str__(self) -> str:
        return f"{self.node_id}@{self.host}:{self.raft_port}:{self.rpc_port}"


def parse_voters(text: str) -> tuple[Voter, ...]:
    """Parse ``'1@127.0.0.1:19091:19191,2@...'``."""
    voters = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            node, address = item.split("@", 1)
            host, raft_port, rpc_port = address.rsplit(":", 2)
            voters.append(Voter(int(node), host, int(raft_port), int(rpc_port)))
        except ValueError as exc:
            raise ConfigError(
                f"invalid voter {item!r}: expected 'id@host:raft_port:rpc_port'"
            ) from exc
    ids = [v.node_id for v in voters]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate voter ids in {text!r}")
    return tuple(voters)


def parse_dial_overrides(text: str) -> dict[str, str]:
    """Parse ``'127.0.0.1:9092=127.0.0.1:19092,...'`` (advertised = dialed)."""
    overrides: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        advertised, _, dialed = item.partition("=")
        for address in (advertised, dialed):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    f"network.dial.overrides: invalid entry {item!r}: "
                    "expected 'host:port=host:port'"
                )
        overrides[advertised.strip()] = dialed.strip()
    return overrides


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _coerce(name: str, value: Any) -> Any:
    if name == "process.roles" and isinstance(value, list):
        value = ",".join(str(v) for v in value)
    try:
        if name in _BOOL_KEYS and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if name in _INT_KEYS and value is not None:
            return int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {value!r} is not a valid value") from exc
    return value


class NodeConfig:
    """The resolved configuration of one node."""

    def __init__(self, values: Mapping[str, Any]):
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown config names: {', '.join(unknown)}")
        merged = {k: d for k, (d, _) in DEFAULTS.items()}
        merged.update({k: _coerce(k, v) for k, v in values.items()})
        self.values = merged
        self._validate()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NodeConfig:
        values: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    values.update(_flatten(tomllib.load(fh)))
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
        env = os.environ if environ is None else environ
        for name in DEFAULTS:
            key = "RAFTKA_" + name.upper().replace(".", "_").replace("-", "_")
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(values)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def _validate(self) -> None:
        if self.values["node.id"] is None or self.node_id < 0:
            raise ConfigError("node.id is required and must be >= 0")
        roles = self.roles
        if not roles or not roles <= {"broker", "controller"}:
            raise ConfigError(f"process.roles must be broker and/or controller, not {roles}")
        voters = self.voters
        if not voters:
            raise ConfigError("controller.quorum.voters is required")
        if "controller" in roles and self.node_id not in {v.node_id for v in voters}:
            raise ConfigError(f"controller {self.node_id} is not in controller.quorum.voters")
        low = self["controller.election.timeout.min.ms"]
        high = self["controller.election.timeout.max.ms"]
        beat = self["controller.heartbeat.interval.ms"]
        if not 0 < 3 * beat < low <= high:
            raise ConfigError(
                "need 3 * controller.heartbeat.interval.ms < election timeout min <= max"
            )
        if "broker" in roles and not self["listeners"]:
            raise ConfigError("a broker needs listeners = 'host:port'")
        self.dial_overrides  # noqa: B018 -- fails early on a malformed value
        self.replication_listener  # noqa: B018 -- fails early on a malformed value
        if self["broker.heartbeat.interval.ms"] >= self["broker.session.timeout.ms"]:
            raise ConfigError("broker.heartbeat.interval.ms must be below the session timeout")
        if self["max.client.streams"] < 0 or self["num.rpc.threads"] < 1:
            raise ConfigError("need max.client.streams >= 0 and num.rpc.threads >= 1")
        slice_ = self["controller.transition.slice.partitions"]
        if not 1 <= slice_ <= self["controller.max.records.per.request"]:
            # An inline transition of that size would be refused as too large.
            raise ConfigError(
                "need 1 <= controller.transition.slice.partitions <= "
                "controller.max.records.per.request"
            )

    @property
    def node_id(self) -> int:
        return int(self.values["node.id"])

    @property
    def roles(self) -> set[str]:
        return {r.strip() for r in str(self.values["process.roles"]).split(",") if r.strip()}

    @property
    def voters(self) -> tuple[Voter, ...]:
        return parse_voters(str(self.values["controller.quorum.voters"]))

    @property
    def self_voter(self) -> Voter | None:
        return next((v for v in self.voters if v.node_id == self.node_id), None)

    @property
    def cluster_id(self) -> str:
        return str(self.values["cluster.id"])

    def path(self, name: str) -> Path:
        value = self.values[name]
        if not value:
            raise ConfigError(f"{name} is required")
        return Path(str(value).split(",")[0])

    @property
    def dial_overrides(self) -> dict[str, str]:
        return parse_dial_overrides(str(self.values["network.dial.overrides"] or ""))

    def dialer(self) -> Callable[[str], str]:
        """The address to dial to reach a node that calls itself ``address``."""
        overrides = self.dial_overrides
        return lambda address: overrides.get(address, address)

    @property
    def replication_listener(self) -> tuple[str, int] | None:
        """The replication listener's host and port, None when there is none."""
        text = str(self.values["replication.listener"]).strip()
        if not text:
            return None
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"replication.listener must be 'host:port', not {text!r}")
        if host in ("0.0.0.0", "::", "[::]"):
            raise ConfigError(
                f"replication.listener {text!r}: the host is advertised to other brokers, "
                "so it must be one they can dial, not a wildcard"
            )
        return host, int(port)

    @property
    def listener(self) -> tuple[str, int]:
        host, port = str(self.values["listeners"]).rsplit(":", 1)
        host = host.split("://")[-1]
        return host, int(port)
