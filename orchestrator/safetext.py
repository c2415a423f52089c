"""Untrusted text made safe once, where it enters bootorch.

Text that came from a host bootorch does not trust -- a DHCP vendor class, a
TFTP or HTTP file name, a followed daemon's log line, a BMC's answer, a node's
readiness output, a control request's reason -- can carry terminal escapes
(``ESC [ 2 J``, OSC 8 hyperlinks, OSC 52 clipboard writes), bidirectional
overrides, bytes that are not UTF-8, and any length. Every consumer of such
text (the SQLite journal, a terminal, rich, JSON, Prometheus labels) must
receive text that is:

* **printable**: every character that :meth:`str.isprintable` rejects (C0 and
  C1 controls, DEL, format characters such as U+202E, lone surrogates,
  unassigned code points, line and paragraph separators) is replaced by a
  visible escape: ``\\xNN`` for code points below 256 and for the raw bytes
  that ``surrogateescape`` decoding left behind, ``\\uNNNN`` / ``\\UNNNNNNNN``
  above. The text stays readable and a reader can still tell what was sent;
* **valid UTF-8**: no lone surrogates remain, so SQLite and ``json.dumps``
  never raise on it;
* **bounded**: at most ``limit`` characters, longer text ends in ``...``.

:func:`safe_text` is the one function that does this. The places that call it
are the entry points of untrusted text: :class:`~orchestrator.events.BootEvent`
(every field and its ``detail``), power drivers' results, readiness results
and control requests. Code downstream of those types may print what they hold.

Rich markup (``[red]``, ``[link=...]``) is a property of one consumer, not of
the text: the rollout view hands untrusted text to rich as ``rich.text.Text``,
which is never parsed as markup.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["MAX_TEXT", "MAX_ITEMS", "safe_text", "safe_value", "safe_mapping"]

#: Default bound, in characters, of one piece of untrusted text.
MAX_TEXT = 1024
#: Most entries kept of an untrusted mapping or sequence (the rest are dropped).
MAX_ITEMS = 64
#: Nesting kept of untrusted mappings and sequences; deeper values become text.
MAX_DEPTH = 4
_ELLIPSIS = "..."


def _escape(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def safe_text(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as printable, valid, bounded text (see the module docstring).

    ``bytes`` are decoded as UTF-8, invalid bytes shown as ``\\xNN``; anything
    else goes through ``str()``. Already-safe text is returned unchanged (one C
    call on the fast path), so calling it on every event costs little.

    >>> safe_text("pxelinux.cfg/\\x1b]8;;http://x\\x07")
    'pxelinux.cfg/\\\\x1b]8;;http://x\\\\x07'
    >>> safe_text(b"a\\xffb")
    'a\\\\xffb'
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    elif not isinstance(value, str):
        value = str(value)
    if len(value) <= limit and value.isprintable():
        return value
    out: list[str] = []
    n = 0
    for ch in value:
        piece = ch if ch.isprintable() else _escape(ch)
        if n + len(piece) > limit:
            keep = max(0, limit - len(_ELLIPSIS))
            text = "".join(out)
            return text[:keep] + _ELLIPSIS if limit >= len(_ELLIPSIS) else text[:limit]
        out.append(piece)
        n += len(piece)
    return "".join(out)


def safe_value(value: Any, limit: int = MAX_TEXT, _depth: int = 0) -> Any:
    """An untrusted structured value with every string in it made safe.

    ``None``, booleans, integers and floats pass as they are; strings and bytes
    go through :func:`safe_text`; mappings and sequences are copied (at most
    :data:`MAX_ITEMS` entries, :data:`MAX_DEPTH` levels; keys become safe text);
    anything else becomes its safe ``str()``.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return safe_text(value, limit)
    if _depth >= MAX_DEPTH:
        return safe_text(value, limit)
    if isinstance(value, Mapping):
        return safe_mapping(value, limit, _depth + 1)
    if isinstance(value, (list, tuple)):
        items = [safe_value(v, limit, _depth + 1) for v in value[:MAX_ITEMS]]
        return tuple(items) if isinstance(value, tuple) else items
    return safe_text(value, limit)


def safe_mapping(value: Mapping[Any, Any], limit: int = MAX_TEXT, _depth: int = 0) -> dict[str, Any]:
    """A copy of an untrusted mapping with safe keys and values (see :func:`safe_value`)."""
    if len(value) <= MAX_ITEMS:
        # Fast path: flat and already safe (a DHCP event's detail): a plain copy.
        for k, v in value.items():
            if type(k) is not str or len(k) > 64 or not k.isprintable():
                break
            t = type(v)
            if t is str:
                if len(v) > limit or not v.isprintable():
                    break
            elif v is not None and t is not int and t is not bool and t is not float:
                break
        else:
            return dict(value)
    out: dict[str, Any] = {}
    for i, (k, v) in enumerate(value.items()):
        if i >= MAX_ITEMS:
            break
        out[k if type(k) is str and k.isprintable() and len(k) <= 64 else safe_text(k, 64)] = safe_value(v, limit, _depth)
    return out
