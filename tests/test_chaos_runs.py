"""Short chaos runs over real processes (CI); longer ones are marked slow (./dev test -m slow)."""

from __future__ import annotations

import pytest

from chaos.runner import run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "scenario",
    [
        "leader-broker-kill",
        "active-controller-kill",
        "group-churn",
        "network-isolate-leader",
        "disk-corrupt",
    ],
)
def test_a_short_run_loses_nothing(tmp_path, scenario):
    result = run(scenario, duration_s=12, seed=7, directory=tmp_path)
    assert result.valid, result.verdict
    assert result.acknowledged > 1000
    assert len(result.faults) >= 1
    assert result.verdict["metadata"]["acknowledged"] > 0
    assert result.verdict["images"]["valid"]
    if scenario != "network-isolate-leader":
        # Each fault costs well under the session timeout (connection-loss fencing). A cut
        # leader is fenced only when its session times out (3 s here).
        assert all(gap["unavailable_s"] < 3.0 for gap in result.unavailability), (
            result.unavailability
        )


def test_a_run_that_truly_loses_acknowledged_records_is_invalid(tmp_path):
    """Every replica of a partition loses its last records (power loss without fsync):
    the verdict must name the lost writes, or a green run would mean nothing."""
    result = run("unsafe-power-loss", duration_s=12, seed=7, directory=tmp_path)
    assert not result.valid
    lost = result.verdict["anomalies"]["lost-write"]
    assert lost["count"] > 0
    assert all(location[0] == 0 for f in lost["findings"] for location in f["locations"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        "leader-broker-kill",
        "active-controller-kill",
        "controller-minority-kill",
        "controller-majority-kill",
        "broker-pause",
        "rolling-restart",
        "network-isolate-controller",
        "network-isolate-leader",
        "network-flaky",
        "disk-corrupt",
        "random-mix",
        "group-churn",
    ],
)
def test_a_long_run_loses_nothing(tmp_path, scenario):
    result = run(scenario, duration_s=60, seed=11, directory=tmp_path)
    assert result.valid, result.verdict


@pytest.mark.slow
def test_a_full_disk_loses_nothing(tmp_path):
    if __import__("os").geteuid() != 0:
        pytest.fail("disk-full mounts a tmpfs per broker: run the slow tests as root")
    result = run("disk-full", duration_s=30, seed=11, directory=tmp_path)
    assert result.valid, result.verdict
