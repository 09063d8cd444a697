import pytest

from hpcmove.errors import UsageError
from hpcmove.units import human, parse_size


@pytest.mark.parametrize("text, value", [
    ("4096", 4096),
    ("1", 1),
    ("64M", 64 << 20),
    ("64m", 64 << 20),
    ("64MB", 64 << 20),
    ("64MiB", 64 << 20),
    ("1G", 1 << 30),
    ("1g", 1 << 30),
    ("1.5GiB", 3 << 29),
    ("1.5gib", 3 << 29),
    ("2K", 2048),
    ("2KB", 2048),
    ("3T", 3 << 40),
    ("1P", 1 << 50),
    (" 8 M ", 8 << 20),
    ("0.5K", 512),
    ("100B", 100),
    (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", [
    "", " ", "M", "abc", "64X", "64 MBs", "-1", "-64M", "1e6", "1,5G", "0", "0M", "0.1",
    "64M64", "G1", "1.G", ".5G", "1..5G",
])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (64 << 20, "64.0 MiB"),
    (3 << 29, "1.5 GiB"),
    (5 << 40, "5.0 TiB"),
    (2 << 50, "2048.0 TiB"),
])
def test_human(n, text):
    assert human(n) == text


def test_human_round_trips_through_parse_size():
    for n in (1 << 10, 3 << 20, 7 << 30):
        number, unit = human(n).split()
        assert parse_size(number + unit) == n
