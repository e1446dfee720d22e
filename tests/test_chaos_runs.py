"""Short chaos runs over real processes (CI); longer ones are marked slow (./dev test -m slow)."""

from __future__ import annotations

import pytest

from chaos.runner import run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "scenario", ["leader-broker-kill", "active-controller-kill", "group-churn"]
)
def test_a_short_run_loses_nothing(tmp_path, scenario):
    result = run(scenario, duration_s=12, seed=7, directory=tmp_path)
    assert result.valid, result.verdict
    assert result.acknowledged > 1000
    assert len(result.faults) >= 1
    # Each fault costs well under the session timeout (connection-loss fencing).
    assert all(gap["unavailable_s"] < 3.0 for gap in result.unavailability), result.unavailability


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        "leader-broker-kill",
        "active-controller-kill",
        "controller-minority-kill",
        "broker-pause",
        "random-mix",
    ],
)
def test_a_long_run_loses_nothing(tmp_path, scenario):
    result = run(scenario, duration_s=60, seed=11, directory=tmp_path)
    assert result.valid, result.verdict
