"""Timestamps go in and out as milliseconds, clamped to what a google.protobuf.Timestamp may name (1970 on, up
to 9999-12-31), so that every timestamp the engine hands back is one any SDK can read, including values a store
written before the clamp on input still holds."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from runtime.wire import MAX_MS, ms_timestamp, timestamp_ms


def test_times_past_year_9999_are_clamped_on_the_way_in() -> None:
    assert timestamp_ms(timestamp_pb2.Timestamp(seconds=2**40)) == MAX_MS
    assert timestamp_ms(timestamp_pb2.Timestamp(seconds=-5)) == 0
    assert timestamp_ms(timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_999_999)) == 1_700_000_000_123


def test_what_goes_out_is_a_valid_timestamp_even_for_values_stored_before_the_clamp() -> None:
    assert ms_timestamp((1 << 63) - 1).ToDatetime().year == 9999  # ToDatetime raises on a value out of range
    assert ms_timestamp(MAX_MS) == timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_000_000)
    assert ms_timestamp(1_700_000_000_123) == timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_000_000)
