"""``raftka produce`` and ``raftka consume`` against fake brokers, and their pure parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fake_broker import FakeCluster
from typer.testing import CliRunner

from broker.record_batch import TimestampType
from cli.data import ProduceSummary, format_record, parse_line, produce_summary_json
from cli.localcluster import NodeSpec
from cli.main import Deps, app
from client import ConsumerRecord, RecordMetadata


@pytest.fixture
def cluster():
    with FakeCluster(brokers=2) as fake:
        fake.create_topic("t", 2)
        yield fake


def run(*args: str, input: str | None = None, obj: Any = None, code: int = 0):
    result = CliRunner().invoke(app, list(args), input=input, obj=obj)
    assert result.exit_code == code, result.output + result.stderr
    return result


def test_produce_then_consume_from_the_beginning(cluster):
    lines = "".join(f"key{i % 3}:value {i}\n" for i in range(12))
    produced = run(
        "produce", "t", "-b", cluster.bootstrap, "--key-separator", ":", "--json", input=lines
    )
    summary = json.loads(produced.stdout)
    assert summary["records"] == 12 and summary["failed"] == 0
    assert sum(p["records"] for p in summary["partitions"]) == 12
    assert all(p["last_offset"] == p["records"] - 1 for p in summary["partitions"])

    consumed = run(
        "consume",
        "t",
        "-b",
        cluster.bootstrap,
        "--from-beginning",
        "--max-messages",
        "12",
        "--format",
        "kv",
    )
    rows = sorted(consumed.stdout.splitlines())
    assert rows == sorted(f"key{i % 3}\tvalue {i}" for i in range(12))
    assert "Processed a total of 12 messages" in consumed.stderr


def test_produce_from_a_file_with_options_prints_a_table(cluster, tmp_path: Path):
    source = tmp_path / "lines.txt"
    source.write_bytes(b"one\r\ntwo\n\nthree")
    produced = run(
        "produce",
        "t",
        "--bootstrap-server",
        cluster.bootstrap,
        "--file",
        str(source),
        "--acks",
        "1",
        "--compression",
        "zstd",
        "--linger-ms",
        "0",
    )
    assert "produced 4 record(s) to t" in produced.stdout
    stored = [r.value for p in (0, 1) for _, r in cluster.records("t", p)]
    assert sorted(stored) == [b"", b"one", b"three", b"two"]


def test_consume_one_partition_from_an_offset_in_json_until_idle(cluster):
    run("produce", "t", "-b", cluster.bootstrap, input="".join(f"{i}\n" for i in range(30)))
    counts = {p: len(cluster.records("t", p)) for p in (0, 1)}
    partition = max(counts, key=lambda p: counts[p])
    consumed = run(
        "consume",
        "t",
        "-b",
        cluster.bootstrap,
        "-p",
        str(partition),
        "--offset",
        "2",
        "--timeout-ms",
        "200",
        "--format",
        "json",
    )
    records = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert [r["offset"] for r in records] == list(range(2, counts[partition]))
    assert {r["partition"] for r in records} == {partition} and records[0]["key"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("consume", "nope", "--timeout-ms", "10"), "topic 'nope' does not exist"),
        (("produce", "nope"), "topic 'nope' does not exist"),
        (("consume", "t", "-p", "5", "--timeout-ms", "10"), "has no partition 5"),
        (("consume", "t", "--format", "xml"), "must be text, json or kv"),
        (("produce", "t", "--acks", "2"), "must be all, 1 or 0"),
        (("produce", "t", "--key-separator", ":"), "line 1 has no key separator ':'"),
    ],
)
def test_bad_input_is_one_error_line(cluster, args, message, monkeypatch):
    monkeypatch.setattr("cli.data.TOPIC_WAIT_S", 0.1)
    result = run(
        *args, "-b", cluster.bootstrap, input="no separator\n", code=2 if "must" in message else 1
    )
    assert message in result.output + result.stderr


class _Cluster:
    """Stands in for LocalCluster: a manifest with one controller and two brokers."""

    def __init__(self, directory: Path, brokers: list[str]):
        self.directory = directory
        self._brokers = brokers

    def exists(self) -> bool:
        return True

    def nodes(self) -> list[NodeSpec]:
        controller = NodeSpec(1, "controller", "127.0.0.1", 1, 2, "c", "l")
        brokers = [
            NodeSpec(100 + i, "broker", a.split(":")[0], int(a.split(":")[1]), None, "c", "l")
            for i, a in enumerate(self._brokers)
        ]
        return [controller, *brokers]


def test_the_local_clusters_brokers_are_used_without_bootstrap(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("RAFTKA_BROKERS", raising=False)
    brokers = cluster.bootstrap.split(",")
    deps = Deps(local_cluster=lambda directory: _Cluster(directory, brokers))
    produced = run("produce", "t", "--dir", str(tmp_path), "--json", input="x\n", obj=deps)
    assert json.loads(produced.stdout)["records"] == 1
    missing = run("produce", "t", "--dir", str(tmp_path / "none"), input="x\n", code=1)
    assert "no local cluster" in missing.stderr


def test_format_record():
    record = ConsumerRecord(
        "t", 1, 42, 0, TimestampType.CREATE_TIME, None, b"caf\xc3\xa9 \xff", (("h", b"v"),), 0
    )
    assert format_record(record, "text") == "café \\xff"
    assert format_record(record, "kv", print_offsets=True) == "1:42\tnull\tcafé \\xff"
    as_json = json.loads(format_record(record, "json"))
    assert as_json == {
        "topic": "t",
        "partition": 1,
        "offset": 42,
        "timestamp": 0,
        "key": None,
        "value": "café \\xff",
        "headers": [["h", "v"]],
    }


def test_parse_line_and_summary():
    assert parse_line(b"k=v=w", b"=", 1) == (b"k", b"v=w")
    assert parse_line(b"k=v", None, 1) == (None, b"k=v")
    summary = ProduceSummary("t")
    summary.delivered(RecordMetadata("t", 0, 5, 0), None)
    summary.delivered(RecordMetadata("t", 0, 6, 0), None)
    summary.delivered(None, RuntimeError("boom"))
    assert produce_summary_json(summary) == {
        "topic": "t",
        "records": 2,
        "failed": 1,
        "error": "boom",
        "partitions": [{"partition": 0, "records": 2, "last_offset": 6}],
    }
