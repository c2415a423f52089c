"""The client side (``orchestrator/protocols/tftp/client.py``), used by other tests: keep it honest."""

from __future__ import annotations

from orchestrator.protocols import tftp as p


# -- the client side (used by other tests; keep it honest) --------------------------


def test_client_rejects_oack_for_options_it_did_not_ask():
    c = p.ReadClient("f", "octet", {"tsize": 0})
    c.start(0.0)
    out, ev = c.datagram(p.encode_oack({"blksize": "1024"}), 0.0)
    assert out[0][:4] == b"\x00\x05\x00\x08" and isinstance(ev[0], p.DownloadFailed)
