"""Idempotent producer state: duplicates, gaps, epochs, rebuild from the log."""

from __future__ import annotations

import pytest

from broker.partition import Partition, PartitionError, PartitionSettings
from broker.producer_state import (
    DUPLICATE,
    FENCED,
    OUT_OF_ORDER,
    ProducerStateManager,
)
from broker.record_batch import Record, encode_batch, iter_batches, read_header
from broker.storage.log import LogConfig, PartitionLog
from quorum.image import PartitionRegistration

PID = 4000


def batch(count: int, sequence: int, epoch: int = 0, pid: int = PID) -> bytes:
    return encode_batch(
        [Record(None, b"v%d" % i, (), 1_000) for i in range(count)],
        producer_id=pid,
        producer_epoch=epoch,
        base_sequence=sequence,
    )


def header(count: int, sequence: int, offset: int, epoch: int = 0, pid: int = PID):
    from dataclasses import replace

    return replace(read_header(batch(count, sequence, epoch, pid)), base_offset=offset)


def test_in_sequence_batches_are_appended_and_a_retry_is_a_duplicate():
    state = ProducerStateManager()
    first = header(3, 0, offset=10)
    assert state.check(first).outcome is None  # unknown producer: accepted
    state.on_append(first)
    second = header(2, 3, offset=13)
    assert state.check(second).outcome is None
    state.on_append(second)
    retry = state.check(header(3, 0, offset=-1))
    assert retry.outcome == DUPLICATE
    assert retry.duplicate_of is not None
    assert (retry.duplicate_of.first_offset, retry.duplicate_of.last_offset) == (10, 12)


def test_a_gap_or_a_forgotten_batch_is_out_of_order():
    state = ProducerStateManager()
    for i in range(7):
        state.on_append(header(1, i, offset=i))
    assert state.check(header(1, 8, offset=-1)).outcome == OUT_OF_ORDER
    # Only the last five batches are remembered, as in Kafka.
    assert state.check(header(1, 1, offset=-1)).outcome == OUT_OF_ORDER
    assert state.check(header(1, 2, offset=-1)).outcome == DUPLICATE
    assert state.check(header(1, 7, offset=-1)).outcome is None


def test_epochs_fence_old_producers_and_restart_sequences():
    state = ProducerStateManager()
    state.on_append(header(2, 0, offset=0, epoch=1))
    assert state.check(header(1, 2, offset=-1, epoch=0)).outcome == FENCED
    assert state.check(header(1, 5, offset=-1, epoch=2)).outcome == OUT_OF_ORDER
    assert state.check(header(1, 0, offset=-1, epoch=2)).outcome is None


def test_sequences_wrap_at_two_to_the_31():
    state = ProducerStateManager()
    state.on_append(header(2, (1 << 31) - 2, offset=0))
    assert state.check(header(1, 0, offset=-1)).outcome is None


def test_non_idempotent_batches_are_never_judged():
    state = ProducerStateManager()
    plain = read_header(encode_batch([Record(None, b"x", (), 1)]))
    assert state.check(plain).outcome is None
    state.on_append(plain)
    assert len(state) == 0


# -- through a partition, over a real log ------------------------------------------


def leader(tmp_path) -> Partition:
    log_ = PartitionLog(tmp_path / "t-0", LogConfig())
    partition = Partition("t", 0, "id", log_, 1, PartitionSettings())
    reg = PartitionRegistration((1,), (1,), 1, 0, 0)
    partition.become_leader(reg, partition.settings)
    return partition


def test_a_hundred_retries_of_one_batch_leave_one_copy(tmp_path):
    partition = leader(tmp_path)
    first = partition.append_as_leader(batch(5, 0), acks=1)
    for _ in range(100):
        again = partition.append_as_leader(batch(5, 0), acks=1)
        assert (again.base_offset, again.last_offset) == (first.base_offset, first.last_offset)
    assert partition.log.log_end_offset == 5
    assert partition.append_as_leader(batch(1, 5), acks=1).base_offset == 5


def test_out_of_order_and_fenced_batches_append_nothing(tmp_path):
    partition = leader(tmp_path)
    partition.append_as_leader(batch(2, 0, epoch=1), acks=1)
    for bad, code in ((batch(1, 7, epoch=1), OUT_OF_ORDER), (batch(1, 2, epoch=0), FENCED)):
        with pytest.raises(PartitionError) as refused:
            partition.append_as_leader(bad, acks=1)
        assert refused.value.code == code
    # A request whose second batch does not follow its first appends neither.
    with pytest.raises(PartitionError):
        partition.append_as_leader(batch(1, 2, epoch=1) + batch(1, 9, epoch=1), acks=1)
    assert partition.log.log_end_offset == 2
    # A retried request of two batches where both made it: both duplicates.
    both = batch(1, 2, epoch=1) + batch(1, 3, epoch=1)
    assert partition.append_as_leader(both, acks=1).base_offset == 2
    again = partition.append_as_leader(both, acks=1)
    assert (again.base_offset, again.last_offset) == (2, 3)
    assert partition.log.log_end_offset == 4


def test_state_is_rebuilt_from_the_log_when_it_is_opened_again(tmp_path):
    partition = leader(tmp_path)
    partition.append_as_leader(batch(3, 0), acks=1)
    partition.log.close()
    reopened = leader(tmp_path)
    duplicate = reopened.append_as_leader(batch(3, 0), acks=1)
    assert (duplicate.base_offset, duplicate.last_offset) == (0, 2)
    assert reopened.log.log_end_offset == 3
    headers = [h for _, h in iter_batches(reopened.log.read(0, 1 << 20))]
    assert [h.producer_id for h in headers] == [PID]
