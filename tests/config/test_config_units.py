"""Unit parsers: what users write in YAML and the normalised values everyone reads."""

from __future__ import annotations

import pytest

from config import (UnitError, format_duration, parse_cpu, parse_duration,
                    parse_percent_or_count, parse_size)


@pytest.mark.parametrize("text, seconds", [
    pytest.param("500ms", 0.5, id="ms"),
    pytest.param("5s", 5.0, id="s"),
    pytest.param("2m", 120.0, id="m"),
    pytest.param("1h30m", 5400.0, id="h-m"),
    pytest.param("1m30.5s", 90.5, id="fraction-last"),
    pytest.param("1.5s", 1.5, id="decimal"),
    pytest.param("250us", 0.00025, id="us"),
    pytest.param(" 10s ", 10.0, id="spaces-trimmed"),
    pytest.param("0", 0.0, id="zero-string"),
    pytest.param("30", 30.0, id="bare-number-string-is-seconds"),
    pytest.param(0, 0.0, id="zero-int"),
    pytest.param(1.5, 1.5, id="float-seconds"),
    pytest.param(10, 10.0, id="int-seconds"),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("value, got", [
    pytest.param("5 sec", '"5 sec"', id="word-unit"),
    pytest.param("-1s", '"-1s"', id="negative-string"),
    pytest.param(-1, "-1", id="negative-number"),
    pytest.param("1d", '"1d"', id="days-not-a-unit"),
    pytest.param("s", '"s"', id="unit-only"),
    pytest.param("5s3", '"5s3"', id="trailing-number"),
    pytest.param("", '""', id="empty"),
    pytest.param(True, "true", id="bool"),
    pytest.param(None, "null", id="null"),
    pytest.param([1], "a list", id="list"),
    pytest.param(float("inf"), "inf", id="infinite"),
])
def test_parse_duration_rejects(value, got):
    with pytest.raises(UnitError) as err:
        parse_duration(value)
    assert str(err.value) == f"expected a duration like 500ms, 5s or 2m, got {got}"


@pytest.mark.parametrize("text, size", [
    pytest.param("128MiB", 128 * 2**20, id="MiB"),
    pytest.param("128Mi", 128 * 2**20, id="Mi"),
    pytest.param("1G", 10**9, id="G"),
    pytest.param("1GB", 10**9, id="GB"),
    pytest.param("4GiB", 4 * 2**30, id="GiB"),
    pytest.param("512k", 512_000, id="k"),
    pytest.param("512K", 512_000, id="K"),
    pytest.param("512Ki", 512 * 1024, id="Ki"),
    pytest.param("1.5Ki", 1536, id="fraction"),
    pytest.param("2T", 2 * 10**12, id="T"),
    pytest.param("100B", 100, id="bytes-B"),
    pytest.param("100", 100, id="bytes-string"),
    pytest.param(1048576, 1048576, id="int"),
    pytest.param(1024.0, 1024, id="integral-float"),
    pytest.param(0, 0, id="zero"),
])
def test_parse_size(text, size):
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize("value, message", [
    pytest.param("lots", 'expected a size like 128MiB, 1G or 512k, got "lots"', id="word"),
    pytest.param("512m", 'expected a size like 128MiB, 1G or 512k, got "512m" (lower-case m is '
                         'ambiguous: write 512M for powers of 1000 or 512Mi for powers of 1024)',
                 id="ambiguous-m"),
    pytest.param("1gb", 'expected a size like 128MiB, 1G or 512k, got "1gb" (lower-case gb is '
                        'ambiguous: write 1G for powers of 1000 or 1Gi for powers of 1024)',
                 id="ambiguous-gb"),
    pytest.param("1.1", 'expected a size like 128MiB, 1G or 512k, got "1.1" (not a whole number '
                        'of bytes)', id="fractional-bytes"),
    pytest.param(-5, "expected a size like 128MiB, 1G or 512k, got -5", id="negative"),
    pytest.param(1.5, "expected a size like 128MiB, 1G or 512k, got 1.5", id="fraction-float"),
    pytest.param("1 Gi B", 'expected a size like 128MiB, 1G or 512k, got "1 Gi B"', id="spaced"),
    pytest.param(False, "expected a size like 128MiB, 1G or 512k, got false", id="bool"),
])
def test_parse_size_rejects(value, message):
    with pytest.raises(UnitError) as err:
        parse_size(value)
    assert str(err.value) == message


@pytest.mark.parametrize("text, cores", [
    pytest.param("0.5", 0.5, id="decimal-string"),
    pytest.param("500m", 0.5, id="millicores"),
    pytest.param("1500m", 1.5, id="millicores-over-one"),
    pytest.param(2, 2.0, id="int"),
    pytest.param(0.25, 0.25, id="float"),
    pytest.param("2", 2.0, id="int-string"),
])
def test_parse_cpu(text, cores):
    assert parse_cpu(text) == cores
    assert isinstance(parse_cpu(text), float)


@pytest.mark.parametrize("value, got", [
    pytest.param("half", '"half"', id="word"),
    pytest.param("500M", '"500M"', id="capital-M"),
    pytest.param("-1", '"-1"', id="negative-string"),
    pytest.param(-0.5, "-0.5", id="negative"),
    pytest.param(True, "true", id="bool"),
])
def test_parse_cpu_rejects(value, got):
    with pytest.raises(UnitError) as err:
        parse_cpu(value)
    assert str(err.value) == f"expected a CPU amount like 0.5, 500m or 2, got {got}"


@pytest.mark.parametrize("value, normalised", [
    pytest.param("25%", "25%", id="percent"),
    pytest.param("0%", "0%", id="zero-percent"),
    pytest.param("150%", "150%", id="over-100-percent"),
    pytest.param(" 25 %", "25%", id="spaced-percent"),
    pytest.param(1, 1, id="count"),
    pytest.param(0, 0, id="zero"),
    pytest.param("3", 3, id="count-string"),
])
def test_parse_percent_or_count(value, normalised):
    assert parse_percent_or_count(value) == normalised


@pytest.mark.parametrize("value, got", [
    pytest.param("25 percent", '"25 percent"', id="word"),
    pytest.param(-1, "-1", id="negative"),
    pytest.param("-5%", '"-5%"', id="negative-percent"),
    pytest.param(1.5, "1.5", id="fraction"),
    pytest.param("2.5%", '"2.5%"', id="fraction-percent"),
    pytest.param(True, "true", id="bool"),
])
def test_parse_percent_or_count_rejects(value, got):
    with pytest.raises(UnitError) as err:
        parse_percent_or_count(value)
    assert str(err.value) == f"expected a count like 1 or a percentage like 25%, got {got}"


@pytest.mark.parametrize("parse, value", [
    (parse_duration, "1h30m"), (parse_duration, "250ms"), (parse_size, "1.5Gi"),
    (parse_cpu, "750m"), (parse_percent_or_count, "40%"), (parse_percent_or_count, 2),
])
def test_normalised_values_parse_to_themselves(parse, value):
    """The JSON document is read back with the same parsers: normalising is idempotent."""
    once = parse(value)
    assert parse(once) == once


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0s"), (0.5, "500ms"), (5.0, "5s"), (90.0, "1m30s"), (5400.0, "1h30m"),
    (600.0, "10m"), (1.25, "1.25s"), (3600.5, "1h0.5s"),
])
def test_format_duration_is_readable_and_parses_back(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds
