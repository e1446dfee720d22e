"""``raftka produce``, ``raftka consume`` and ``raftka topic describe`` as a user runs
them: separate processes against a real local cluster (3 controllers, 3 brokers).

Every test creates its own topic, so the order of the tests does not matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import running_cluster

from client import Admin, partitioner

pytestmark = pytest.mark.integration

# The console script the venv installs; the same entry point as "python -m cli.main".
RAFTKA = [str(Path(sys.executable).with_name("raftka"))]
if not Path(RAFTKA[0]).exists():
    RAFTKA = [sys.executable, "-m", "cli.main"]
# A bound on each command, far above what it needs: a hang fails instead of blocking.
COMMAND_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(
        tmp_path_factory.mktemp("cli-data"),
        controllers=3,
        brokers=3,
        overrides={
            "broker.session.timeout.ms": 2000,
            "broker.heartbeat.interval.ms": 250,
            "replica.lag.time.max.ms": 2000,
            "replica.fetch.wait.max.ms": 200,
        },
    ) as cluster:
        yield cluster


def raftka(*args: str, stdin: str | None = None, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*RAFTKA, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        # RAFTKA_HOME and RAFTKA_BROKERS from the caller's shell must not steer the CLI.
        env={k: v for k, v in os.environ.items() if not k.startswith("RAFTKA_")},
    )
    assert done.returncode == code, f"raftka {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def describe(cluster, topic: str) -> dict[str, Any]:
    (described,) = json.loads(
        raftka("topic", "describe", topic, "--json", "--dir", str(cluster.directory)).stdout
    )
    return described


def test_produce_consume_and_describe_through_the_cli(cluster):
    where = ("--dir", str(cluster.directory))
    created = json.loads(
        raftka(
            "topic", "create", "lines", "-p", "3", "-r", "3", "-c", "min.insync.replicas=2",
            "--json", *where,
        ).stdout
    )  # fmt: skip
    assert (created["num_partitions"], created["replication_factor"]) == (3, 3)

    sent = [(f"k{i % 10}", f"value {i}") for i in range(300)]
    produced = json.loads(
        raftka(
            "produce", "lines", "--key-separator", ":", "--json", *where,
            stdin="".join(f"{k}:{v}\n" for k, v in sent),
        ).stdout
    )  # fmt: skip
    assert (produced["records"], produced["failed"], produced["error"]) == (300, 0, None)
    per_partition = {p["partition"]: p for p in produced["partitions"]}
    assert sum(p["records"] for p in per_partition.values()) == 300
    assert all(p["last_offset"] == p["records"] - 1 for p in per_partition.values())

    consumed = raftka(
        "consume", "lines", "--from-beginning", "--max-messages", "300", "--format", "json",
        *where,
    )  # fmt: skip
    assert "Processed a total of 300 messages" in consumed.stderr
    records = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert len(records) == 300
    assert sorted((r["key"], r["value"]) for r in records) == sorted(sent)
    by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        assert r["topic"] == "lines" and r["headers"] == []
        assert r["partition"] == partitioner.partition_for_key(r["key"].encode(), 3)
        by_partition[r["partition"]].append(r)
    for partition, rs in by_partition.items():
        # One partition's records print in offset order, from 0, with no gap.
        assert [r["offset"] for r in rs] == list(range(len(rs)))
        assert len(rs) == per_partition[partition]["records"]
        for key in {r["key"] for r in rs}:
            assert [r["value"] for r in rs if r["key"] == key] == [v for k, v in sent if k == key]

    topic = describe(cluster, "lines")
    assert topic["configs"]["min.insync.replicas"] == "2"
    for p in topic["partitions"]:
        # acks=all (the default) answered only once the leader's high watermark passed
        # every record, so the leader's log shows them all.
        count = len(by_partition.get(p["partition"], []))
        assert (p["log_start_offset"], p["log_end_offset"], p["high_watermark"]) == (
            0,
            count,
            count,
        ), p
        assert sorted(r["broker_id"] for r in p["replica_logs"]) == sorted(p["replicas"])
        leader_log = next(r for r in p["replica_logs"] if r["broker_id"] == p["leader"])
        assert leader_log["role"] == "leader" and leader_log["high_watermark"] == count


def test_produce_from_a_file_and_consume_one_partition_from_an_offset(cluster, tmp_path: Path):
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("file", 2, 3)
        brokers = ",".join(b.address for b in admin.describe_cluster().brokers)
    source = tmp_path / "lines.txt"
    # CRLF line endings, as a file from another system may have; an empty value.
    source.write_bytes(b"".join(f"a{i}|{i}\r\n".encode() for i in range(40)) + b"b|\r\n")
    produced = json.loads(
        raftka(
            "produce", "file", "-f", str(source), "--key-separator", "|", "--acks", "1",
            "--compression", "zstd", "-b", brokers, "--json",
        ).stdout
    )  # fmt: skip
    assert (produced["records"], produced["failed"]) == (41, 0)

    partition = partitioner.partition_for_key(b"a7", 2)
    expected = [
        (k, v)
        for k, v in [(f"a{i}", str(i)) for i in range(40)] + [("b", "")]
        if partitioner.partition_for_key(k.encode(), 2) == partition
    ]
    consumed = raftka(
        "consume", "file", "-p", str(partition), "--offset", "2", "--timeout-ms", "3000",
        "--format", "kv", "--print-offsets", "-b", brokers,
    )  # fmt: skip
    lines = consumed.stdout.splitlines()
    assert lines == [f"{partition}:{o}\t{k}\t{v}" for o, (k, v) in enumerate(expected)][2:]
    assert f"Processed a total of {len(expected) - 2} messages" in consumed.stderr


def test_a_missing_topic_is_one_error_line(cluster):
    failed = raftka("consume", "no-such-topic", "--dir", str(cluster.directory), code=1)
    assert failed.stdout == ""
    assert failed.stderr.strip() == "error: topic 'no-such-topic' does not exist"
    failed = raftka(
        "produce", "no-such-topic", "--dir", str(cluster.directory), stdin="x\n", code=1
    )
    assert "topic 'no-such-topic' does not exist" in failed.stderr
