"""A cluster of real node processes on this machine, for demos, tests and chaos.

Theory of operation. ``create`` writes everything a cluster needs into one
directory: a TOML config per node (``node-<id>/node.toml``, with its data
directories beside it) and a manifest, ``cluster.json``, naming every node, its
ports and, once started, its process. ``start`` launches each node that is not
running as its own process (``python -m cli.main controller|broker start``) in
its own session, with output to ``node-<id>/node.log``, and records its pid
and creation time. ``stop`` signals those processes.

A node counts as running only if a process with the recorded pid exists, is
not a zombie, and was created at the recorded time. pids are reused by the
kernel; checking the creation time means a stale manifest never makes us
signal an unrelated process. Nothing here finds or kills processes by name.

Because the ids, configs and data directories stay in the directory, starting
an existing cluster again brings back the same nodes with their data, and
``start`` only launches the nodes that are down.

Ports are picked by binding port 0 on loopback and closing the socket; another
program may take one in between, which shows up as a node that fails to start
(see its node.log).

This module imports neither typer nor the node implementations, so the chaos
harness and tests use it directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

MANIFEST = "cluster.json"
# 2 added brokers' replication ports; a version-1 manifest reads as brokers without.
MANIFEST_VERSION = 2
_READABLE_VERSIONS = {1, 2}
FIRST_CONTROLLER_ID = 1
FIRST_BROKER_ID = 100
# Creation times are read from /proc, in units of clock ticks since boot; the
# boot time they are added to can move by a second under clock adjustment.
# A pid recycled within a second is not a real risk.
CREATE_TIME_TOLERANCE_S = 1.0
_POLL_S = 0.05


class LocalClusterError(RuntimeError):
    """The local cluster directory is missing, invalid, or a node will not start."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of the manifest. Paths are relative to the cluster directory."""

    id: int
    role: str  # "controller" or "broker"
    host: str
    rpc_port: int
    raft_port: int | None
    config: str
    log: str
    pid: int | None = None
    create_time: float | None = None
    # A broker's replication listener (None in a cluster made before it existed).
    replication_port: int | None = None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    id: int
    role: str
    pid: int | None
    running: bool
    host: str
    rpc_port: int
    raft_port: int | None
    config: str
    log: str
    # "running", "paused" (SIGSTOP) or "stopped".
    state: str
    replication_port: int | None = None

    @property
    def rpc_address(self) -> str:
        return f"{self.host}:{self.rpc_port}"


# How a node is launched: the argv for a node, given its absolute config path.
Launcher = Callable[[NodeSpec, Path], list[str]]


def default_command(node: NodeSpec, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", node.role, "start", "--config", str(config_path)]


class LocalCluster:
    def __init__(self, directory: str | os.PathLike[str], *, command: Launcher | None = None):
        # ``command`` lets tests launch a harmless process in place of a node.
        self.directory = Path(directory).resolve()
        self._command = command or default_command
        # Children started by this object, so they can be reaped (no zombies
        # while we wait for them to exit).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- manifest ----------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise LocalClusterError(
                f"no local cluster in {self.directory} (run 'raftka cluster up')"
            ) from None
        except (OSError, ValueError) as exc:
            raise LocalClusterError(f"cannot read {self.manifest_path}: {exc}") from exc
        if data.get("version") not in _READABLE_VERSIONS:
            raise LocalClusterError(f"{self.manifest_path}: unsupported manifest version")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.manifest_path)

    def nodes(self) -> list[NodeSpec]:
        return [NodeSpec(**n) for n in self._read()["nodes"]]

    def _save_nodes(self, nodes: Iterable[NodeSpec]) -> None:
        data = self._read()
        data["nodes"] = [asdict(n) for n in sorted(nodes, key=lambda n: n.id)]
        data["version"] = MANIFEST_VERSION  # The nodes are now written in its form.
        self._write(data)

    @property
    def cluster_id(self) -> str:
        return str(self._read()["cluster_id"])

    @property
    def bootstrap(self) -> str:
        """The controllers' RPC addresses, comma-separated."""
        return ",".join(f"{n.host}:{n.rpc_port}" for n in self.nodes() if n.role == "controller")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize changes to the manifest between processes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- create ------------------------------------------------------------

    def create(
        self,
        controllers: int = 3,
        brokers: int = 3,
        host: str = "127.0.0.1",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        """Write configs and the manifest for a new cluster; starts nothing.

        ``overrides`` are config values written into every node's file.
        """
        if controllers < 1 or brokers < 0:
            raise LocalClusterError("need at least one controller and no negative broker count")
        with self._locked():
            if self.exists():
                raise LocalClusterError(f"a cluster already exists in {self.directory}")
            ports = free_ports(2 * controllers + 2 * brokers, host)
            nodes = _plan_nodes(controllers, brokers, host, ports)
            cluster_id = uuid.uuid4().hex
            settings = {
                "cluster_id": cluster_id,
                "password": secrets.token_hex(16),
                "voters": ",".join(
                    f"{n.id}@{n.host}:{n.raft_port}:{n.rpc_port}"
                    for n in nodes
                    if n.role == "controller"
                ),
                "brokers": brokers,
                "overrides": dict(overrides or {}),
            }
            for node in nodes:
                node_dir = self.directory / f"node-{node.id}"
                node_dir.mkdir(parents=True, exist_ok=True)
                config_text = render_config(node, node_dir, settings)
                config_path = self.directory / node.config
                config_path.write_text(config_text)
                if node.role == "controller":
                    # The file holds the quorum password.
                    config_path.chmod(0o600)
            self._write(
                {
                    "version": MANIFEST_VERSION,
                    "cluster_id": cluster_id,
                    "created_ms": int(time.time() * 1000),
                    "nodes": [asdict(n) for n in nodes],
                }
            )

    def update_config(self, node_id: int, values: dict[str, Any]) -> None:
        """Set config values in one node's file (read when the node next starts)."""
        node = next((n for n in self.nodes() if n.id == node_id), None)
        if node is None:
            raise LocalClusterError(f"no node {node_id} in {self.directory}")
        path = self.directory / node.config
        pending = dict(values)
        lines = []
        for line in path.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if "=" in line and not line.lstrip().startswith("#") and key in pending:
                line = f"{key} = {_toml_value(pending.pop(key))}"
            lines.append(line)
        lines += [f"{key} = {_toml_value(value)}" for key, value in pending.items()]
        path.write_text("\n".join(lines) + "\n")

    # -- processes ---------------------------------------------------------

    def status(self) -> list[NodeStatus]:
        self._reap()
        return [self._status(n) for n in self.nodes()]

    def _reap(self) -> None:
        """Collect the exit status of our own children that ended."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    def _status(self, node: NodeSpec) -> NodeStatus:
        process = self._process(node)
        state = "stopped"
        if process is not None:
            state = "paused" if _is_stopped(process) else "running"
        return NodeStatus(
            id=node.id,
            role=node.role,
            pid=node.pid if process is not None else None,
            running=process is not None,
            host=node.host,
            rpc_port=node.rpc_port,
            raft_port=node.raft_port,
            replication_port=node.replication_port,
            config=str(self.directory / node.config),
            log=str(self.directory / node.log),
            state=state,
        )

    def _process(self, node: NodeSpec) -> psutil.Process | None:
        """The node's live process, or None; never a stranger with a reused pid."""
        return live_process(node.pid, node.create_time)

    def start(self, node_ids: Iterable[int] | None = None) -> list[int]:
        """Launch every selected node that is not running; returns the ids launched."""
        launched = []
        with self._locked():
            nodes = self.nodes()
            selected = _select(nodes, node_ids)
            updated = {n.id: n for n in nodes}
            for node in selected:
                if self._process(node) is not None:
                    continue
                updated[node.id] = self._launch(node)
                launched.append(node.id)
            self._save_nodes(updated.values())
        return launched

    def _launch(self, node: NodeSpec) -> NodeSpec:
        config_path = self.directory / node.config
        log_path = self.directory / node.log
        node_dir = config_path.parent
        with open(log_path, "ab") as log:
            log.write(f"--- starting node {node.id} at {time.ctime()} ---\n".encode())
            log.flush()
            child = subprocess.Popen(
                self._command(node, config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node_dir,
                start_new_session=True,
            )
        self._children[child.pid] = child
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.NoSuchProcess:
            # It exited already; record nothing so it reads as stopped.
            child.wait(timeout=1)
            return replace(node, pid=None, create_time=None)
        return replace(node, pid=child.pid, create_time=create_time)

    def stop(
        self, node_ids: Iterable[int] | None = None, timeout_s: float = 15.0, kill: bool = False
    ) -> list[int]:
        """Stop the selected running nodes; returns the ids that were running.

        Brokers go first so that they can shut down in a controlled way while
        the controllers are still up. SIGTERM (SIGKILL when ``kill``), then
        SIGKILL for a node still alive after ``timeout_s``.
        """
        with self._locked():
            nodes = self.nodes()
            selected = _select(nodes, node_ids)
            stopped: list[int] = []
            for role in ("broker", "controller"):
                group = [n for n in selected if n.role == role]
                stopped += self._signal_and_wait(group, timeout_s, kill)
            # Forget the processes of stopped nodes, so the manifest says what is running.
            gone = {n.id for n in selected}
            self._save_nodes(
                replace(n, pid=None, create_time=None) if n.id in gone else n for n in nodes
            )
        return stopped

    def kill(self, node_id: int) -> bool:
        """SIGKILL one node; returns whether it was running."""
        return bool(self.stop([node_id], kill=True))

    def _signal_and_wait(self, nodes: list[NodeSpec], timeout_s: float, kill: bool) -> list[int]:
        sig = signal.SIGKILL if kill else signal.SIGTERM
        signalled = {}
        for node in nodes:
            process = self._process(node)
            if process is None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)
                # A paused process would hold the SIGTERM until continued.
                process.send_signal(signal.SIGCONT)
            signalled[node.id] = process
        alive = self._wait_gone(signalled, timeout_s)
        for process in alive.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        still = self._wait_gone(alive, 5.0)
        if still:
            raise LocalClusterError(f"nodes {sorted(still)} did not exit after SIGKILL")
        return sorted(signalled)

    def _wait_gone(
        self, processes: dict[int, psutil.Process], timeout_s: float
    ) -> dict[int, psutil.Process]:
        """Wait until the processes have exited; returns those still alive."""
        deadline = time.monotonic() + timeout_s
        alive = dict(processes)
        while alive:
            for node_id, process in list(alive.items()):
                child = self._children.get(process.pid)
                if child is not None and child.poll() is not None:
                    del self._children[process.pid]
                if not _is_alive(process):
                    del alive[node_id]
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        return alive

    def pause(self, node_id: int) -> None:
        """SIGSTOP: the process stays, frozen, as on a stalled machine."""
        self._signal_one(node_id, signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        self._signal_one(node_id, signal.SIGCONT)

    def _signal_one(self, node_id: int, sig: signal.Signals) -> None:
        node = _select(self.nodes(), [node_id])[0]
        process = self._process(node)
        if process is None:
            raise LocalClusterError(f"node {node_id} is not running")
        process.send_signal(sig)

    # -- readiness ---------------------------------------------------------

    def wait_ready(
        self, timeout_s: float = 60.0, on_progress: Callable[[str], None] | None = None
    ) -> None:
        """Wait until the quorum has a leader and every broker is registered and
        unfenced. Raises ``LocalClusterError`` on timeout or when a node exits."""
        from client.admin import Admin
        from client.errors import RaftkaError

        deadline = time.monotonic() + timeout_s
        broker_ids = {n.id for n in self.nodes() if n.role == "broker"}
        reason: str | None = "waiting for the controllers"
        with Admin(self.bootstrap, timeout_s=2.0) as admin:
            while True:
                self._check_alive()
                try:
                    reason = _not_ready_reason(admin, broker_ids)
                except (RaftkaError, OSError) as exc:
                    reason = f"controllers not answering yet ({exc})"
                if reason is None:
                    return
                if on_progress is not None:
                    on_progress(reason)
                if time.monotonic() >= deadline:
                    raise LocalClusterError(f"cluster not ready after {timeout_s:g} s: {reason}")
                time.sleep(0.2)

    def _check_alive(self) -> None:
        for status in self.status():
            if not status.running:
                tail = _tail(Path(status.log))
                raise LocalClusterError(
                    f"{status.role} {status.id} is not running; see {status.log}"
                    + (f":\n{tail}" if tail else "")
                )


def _not_ready_reason(admin: Any, broker_ids: set[int]) -> str | None:
    quorum = admin.describe_quorum()
    if quorum.leader_id < 0:
        return "the quorum has no leader yet"
    cluster = admin.describe_cluster()
    registered = {b.broker_id: b for b in cluster.brokers}
    missing = sorted(broker_ids - set(registered))
    if missing:
        return f"brokers not registered yet: {missing}"
    fenced = sorted(i for i in broker_ids if registered[i].fenced)
    if fenced:
        return f"brokers still fenced: {fenced}"
    return None


def live_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The process with this pid if it is alive and was created at ``create_time``."""
    if not pid or create_time is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return process


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_stopped(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def _select(nodes: list[NodeSpec], node_ids: Iterable[int] | None) -> list[NodeSpec]:
    if node_ids is None:
        return nodes
    wanted = set(node_ids)
    unknown = wanted - {n.id for n in nodes}
    if unknown:
        raise LocalClusterError(f"no such node: {sorted(unknown)}")
    return [n for n in nodes if n.id in wanted]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _plan_nodes(controllers: int, brokers: int, host: str, ports: list[int]) -> list[NodeSpec]:
    free = iter(ports)
    nodes = []
    for i in range(controllers):
        node_id = FIRST_CONTROLLER_ID + i
        raft_port, rpc_port = next(free), next(free)
        nodes.append(_spec(node_id, "controller", host, rpc_port, raft_port))
    for i in range(brokers):
        rpc_port, replication_port = next(free), next(free)
        broker = _spec(FIRST_BROKER_ID + i, "broker", host, rpc_port, None)
        nodes.append(replace(broker, replication_port=replication_port))
    return nodes


def _spec(node_id: int, role: str, host: str, rpc_port: int, raft_port: int | None) -> NodeSpec:
    return NodeSpec(
        id=node_id,
        role=role,
        host=host,
        rpc_port=rpc_port,
        raft_port=raft_port,
        config=f"node-{node_id}/node.toml",
        log=f"node-{node_id}/node.log",
    )


def render_config(node: NodeSpec, node_dir: Path, settings: dict[str, Any]) -> str:
    """The TOML config of one node. Keys are Kafka's dotted names."""
    brokers = int(settings["brokers"])
    values: dict[str, Any] = {
        "node.id": node.id,
        "process.roles": node.role,
        "cluster.id": settings["cluster_id"],
        "controller.quorum.voters": settings["voters"],
    }
    if node.role == "controller":
        values.update(
            {
                # Only the voters need the Raft secret; brokers speak gRPC.
                "controller.quorum.password": settings["password"],
                "metadata.log.dir": str(node_dir / "metadata"),
                # Topic defaults are decided by the controller: three copies
                # and two in sync, as in production, when there are brokers
                # enough.
                "default.replication.factor": max(1, min(3, brokers)),
                "min.insync.replicas": 2 if brokers >= 3 else 1,
            }
        )
    else:
        values.update(
            {
                "listeners": f"{node.host}:{node.rpc_port}",
                "log.dirs": str(node_dir / "data"),
            }
        )
        if node.replication_port is not None:
            values["replication.listener"] = f"{node.host}:{node.replication_port}"
    values.update(
        {
            "broker.session.timeout.ms": 9000,
            "broker.heartbeat.interval.ms": 2000,
        }
    )
    values.update(settings.get("overrides", {}))
    lines = [f"# raftka {node.role} {node.id}, written by 'raftka cluster up'."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value))
