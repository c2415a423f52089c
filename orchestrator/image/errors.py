"""The image builder's error: what ``bootorch image build`` reports and exits 1 on."""

from __future__ import annotations


class ImageError(Exception):
    """The image cannot be built (missing package, unknown module, bad plan values)."""
