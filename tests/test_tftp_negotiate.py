"""Option negotiation (``orchestrator/protocols/tftp/negotiate.py``): RFC 2347/2348/2349/7440 edge cases."""

from __future__ import annotations

import pytest

from orchestrator.protocols import tftp as p


# -- option negotiation edge cases ------------------------------------------------------


@pytest.mark.parametrize(
    "value, cap, expect",
    [
        ("0", 1468, None),  # below RFC 2348's 8: ignored, 512 applies
        ("7", 1468, None),
        ("8", 1468, 8),
        ("512", 1468, 512),
        ("1468", 1468, 1468),
        ("9000", 1468, 1468),  # capped by the path-MTU default
        ("65464", 65464, 65464),
        ("65465", 65464, 65464),  # above the range: clamped (server may answer smaller)
        ("99999999999", 65464, None),  # more than 10 digits: not a number we parse
        ("-1", 1468, None),
        ("abc", 1468, None),
        ("", 1468, None),
        (" 512", 1468, None),
        ("+512", 1468, None),
        ("5_12", 1468, None),
        ("\u0665\u0661\u0662", 1468, None),  # Arabic-Indic digits: int() would take them
    ],
)
def test_blksize_values(value, cap, expect):
    n = p.negotiate({"blksize": value}, tsize=None, blksize_max=cap)
    if expect is None:
        assert "blksize" not in n.oack and n.blksize == 512
    else:
        assert n.oack["blksize"] == str(expect) and n.blksize == expect


@pytest.mark.parametrize("value, expect", [("0", None), ("1", 1), ("255", 255), ("256", None), ("abc", None), ("-5", None)])
def test_timeout_values(value, expect):
    n = p.negotiate({"timeout": value}, tsize=None)
    assert n.timeout == expect
    assert n.oack.get("timeout") == (None if expect is None else value)


@pytest.mark.parametrize("value, cap, expect", [("0", 64, None), ("1", 64, 1), ("16", 64, 16), ("65", 64, 64), ("65535", 65535, 65535), ("65536", 65535, 65535), ("65536", 64, 64), ("x", 64, None)])
def test_windowsize_values(value, cap, expect):
    n = p.negotiate({"windowsize": value}, tsize=None, windowsize_max=cap, client_rcvbuf=None)
    if expect is None:
        assert "windowsize" not in n.oack and n.windowsize == 1
    else:
        assert n.windowsize == expect and n.oack["windowsize"] == str(expect)


@pytest.mark.parametrize("order", ["windowsize-first", "blksize-first"])
def test_window_is_capped_to_fit_the_client_buffer_whatever_the_option_order(order):
    opts = {"windowsize": "64", "blksize": "8192"}
    if order == "blksize-first":
        opts = {"blksize": "8192", "windowsize": "64"}
    n = p.negotiate(opts, tsize=None, blksize_max=8192, windowsize_max=64)
    assert n.windowsize == p.CLIENT_RCVBUF // p.datagram_cost(8192) == 9
    assert list(n.oack) == list(opts) and n.oack["windowsize"] == "9"
    assert p.negotiate(opts, tsize=None, blksize_max=65464, client_rcvbuf=1000).windowsize == 1
    assert p.negotiate(opts, tsize=None, blksize_max=8192, client_rcvbuf=None).windowsize == 64
    # The path-MTU default block size keeps a 64-block window.
    assert p.negotiate({"windowsize": "64", "blksize": "1468"}, tsize=None).windowsize == 64


def test_tsize_answers_the_size_and_ignores_non_numbers():
    assert p.negotiate({"tsize": "0"}, tsize=1234).oack == {"tsize": "1234"}
    assert p.negotiate({"tsize": "99"}, tsize=1234).oack == {"tsize": "1234"}
    assert p.negotiate({"tsize": "zero"}, tsize=1234).oack == {}
    assert p.negotiate({"tsize": "0"}, tsize=None).oack == {}
    assert p.negotiate({"tsize": "0"}, tsize=0).oack == {}  # curl rejects "tsize 0"


def test_oack_keeps_client_order_and_drops_unknown():
    n = p.negotiate({"windowsize": "4", "foo": "1", "tsize": "0", "blksize": "1024"}, tsize=10)
    assert list(n.oack.items()) == [("windowsize", "4"), ("tsize", "10"), ("blksize", "1024")]


def test_duplicate_options_first_wins_and_names_are_case_insensitive():
    req = p.parse_packet(b"\x00\x01f\x00octet\x00BlkSize\x001024\x00blksize\x00512\x00TSIZE\x000\x00")
    assert req.options == {"blksize": "1024", "tsize": "0"}
    n = p.negotiate(req.options, tsize=5)
    assert n.blksize == 1024 and n.oack == {"blksize": "1024", "tsize": "5"}
