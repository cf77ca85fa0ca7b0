"""Flag value types of the command line: sizes, ports, ranges."""

from __future__ import annotations

import argparse

import pytest

from engine import cli_checks as ck


@pytest.mark.parametrize(("text", "size"), [
    ("512M", 512 * 1024**2), ("2G", 2 * 1024**3), ("1.5GiB", 3 * 1024**3 // 2),
    ("64k", 65536), ("1048576", 1048576), ("0", 0), ("4mb", 4 * 1024**2),
])
def test_sizes_take_binary_units(text, size):
    assert ck.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12Q", "-1G", "nan", "inf"])
def test_nonsense_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        ck.parse_size(text)


@pytest.mark.parametrize("n", [512 * 1024**2, 1024**3, 4 * 1024**2, 1000, 1536 * 1024])
def test_format_size_reads_back(n):
    assert ck.parse_size(ck.format_size(n)) == n


def test_ports_are_0_to_65535():
    assert ck.port("1") == 1 and ck.port("65535") == 65535 and ck.port("0") == 0
    for bad in ("65536", "-1", "eighty"):
        with pytest.raises(argparse.ArgumentTypeError):
            ck.port(bad)


def test_ranges():
    assert ck.fraction("1") == 1.0
    for bad in ("0", "1.01", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            ck.fraction(bad)
    assert ck.positive_int("1") == 1
    with pytest.raises(argparse.ArgumentTypeError):
        ck.positive_int("0")
    assert ck.non_negative_float("0") == 0.0
