"""Node config: parsing and validation of the values that are not plain numbers."""

from __future__ import annotations

import pytest

from cli.localcluster import LocalCluster
from quorum.config import ConfigError, NodeConfig, parse_dial_overrides
from quorum.raft import _DialedNode

VOTERS = "1@127.0.0.1:7001:7101,2@127.0.0.1:7002:7102,3@127.0.0.1:7003:7103"


def _config(**values: object) -> NodeConfig:
    base = {"node.id": 1, "process.roles": "controller", "controller.quorum.voters": VOTERS}
    return NodeConfig({**base, **values})


def test_dial_overrides_map_advertised_addresses_and_leave_others_alone():
    config = _config(
        **{"network.dial.overrides": "127.0.0.1:7002=127.0.0.1:9002, 127.0.0.1:7102=127.0.0.1:9102"}
    )
    dial = config.dialer()
    assert dial("127.0.0.1:7002") == "127.0.0.1:9002"
    assert dial("127.0.0.1:7102") == "127.0.0.1:9102"
    assert dial("127.0.0.1:7003") == "127.0.0.1:7003"
    assert _config().dialer()("127.0.0.1:7003") == "127.0.0.1:7003"


@pytest.mark.parametrize(
    "text", ["127.0.0.1:7002", "127.0.0.1:7002=", "=127.0.0.1:1", "a:b=c:d", "h:1=h:70000"]
)
def test_malformed_dial_overrides_are_refused_at_load(text):
    with pytest.raises(ConfigError, match="network.dial.overrides"):
        _config(**{"network.dial.overrides": text})
    with pytest.raises(ConfigError):
        parse_dial_overrides(text)


def test_a_dialed_voter_keeps_its_identity_and_changes_only_where_it_is_reached():
    node = _DialedNode("127.0.0.1:7002", "127.0.0.1:9002")
    assert node.address == node.id == "127.0.0.1:7002"
    assert (node.ip, node.port) == ("127.0.0.1", 9002)
    # pysyncobj matches an incoming connection to a peer by the announced address.
    assert node == _DialedNode("127.0.0.1:7002", "127.0.0.1:7002")


def test_update_config_replaces_and_adds_values(tmp_path):
    cluster = LocalCluster(tmp_path / "c")
    cluster.create(controllers=1, brokers=1)
    broker = next(n for n in cluster.nodes() if n.role == "broker")
    cluster.update_config(
        broker.id,
        {"broker.session.timeout.ms": 4000, "network.dial.overrides": "127.0.0.1:1=127.0.0.1:2"},
    )
    config = NodeConfig.load(cluster.directory / broker.config, environ={})
    assert config["broker.session.timeout.ms"] == 4000
    assert config.dial_overrides == {"127.0.0.1:1": "127.0.0.1:2"}


def test_client_streams_need_a_count_of_zero_or_more():
    with pytest.raises(ConfigError, match="max.client.streams"):
        _config(**{"max.client.streams": -1})
    # A config written for fewer threads still loads; the broker serves fewer streams.
    assert _config(**{"num.rpc.threads": 16, "max.client.streams": 64})["max.client.streams"] == 64


@pytest.mark.parametrize("value", [0, -1, 20_001])
def test_a_transition_slice_must_fit_in_one_request(value):
    """Zero slices nothing; past controller.max.records.per.request an inline
    transition would be refused as a request too large."""
    with pytest.raises(ConfigError, match="controller.transition.slice.partitions"):
        _config(**{"controller.transition.slice.partitions": value})
    assert _config(**{"controller.transition.slice.partitions": 20_000})


def test_the_replication_listener_is_optional_and_checked_at_load():
    assert _config().replication_listener is None
    assert _config(**{"replication.listener": "127.0.0.1:0"}).replication_listener == (
        "127.0.0.1",
        0,
    )
    for text in ["127.0.0.1", ":9000", "127.0.0.1:x", "127.0.0.1:70000", "0.0.0.0:9000"]:
        with pytest.raises(ConfigError, match="replication.listener"):
            _config(**{"replication.listener": text})
