"""TFTP's numbers: opcodes, error codes, option ranges, each beside the RFC text it comes from.

Used by every other module of the package; imports nothing.
"""

from __future__ import annotations

__all__ = [
    "RRQ", "WRQ", "DATA", "ACK", "ERROR", "OACK",
    "ERR_NOT_DEFINED", "ERR_FILE_NOT_FOUND", "ERR_ACCESS_VIOLATION", "ERR_DISK_FULL",
    "ERR_ILLEGAL_OPERATION", "ERR_UNKNOWN_TID", "ERR_FILE_EXISTS", "ERR_NO_SUCH_USER",
    "ERR_OPTION_NEGOTIATION", "ERROR_MESSAGES",
    "DEFAULT_BLKSIZE", "BLKSIZE_MIN", "BLKSIZE_MAX", "PATH_MTU_BLKSIZE", "TIMEOUT_MIN", "TIMEOUT_MAX",
    "WINDOWSIZE_MIN", "WINDOWSIZE_MAX", "MODES", "MAX_PEER_MESSAGE",
]

# --- RFC 1350 section 5: opcodes ------------------------------------------------
RRQ = 1  #: Read request (RFC 1350 section 5)
WRQ = 2  #: Write request (RFC 1350 section 5)
DATA = 3  #: Data (RFC 1350 section 5)
ACK = 4  #: Acknowledgment (RFC 1350 section 5)
ERROR = 5  #: Error (RFC 1350 section 5)
OACK = 6  #: Option Acknowledgment (RFC 2347 "Packet Formats")

# --- RFC 1350 appendix "Error Codes", plus RFC 2347 code 8 ----------------------
ERR_NOT_DEFINED = 0  #: "Not defined, see error message (if any)."
ERR_FILE_NOT_FOUND = 1  #: "File not found."
ERR_ACCESS_VIOLATION = 2  #: "Access violation."
ERR_DISK_FULL = 3  #: "Disk full or allocation exceeded."
ERR_ILLEGAL_OPERATION = 4  #: "Illegal TFTP operation."
ERR_UNKNOWN_TID = 5  #: "Unknown transfer ID."
ERR_FILE_EXISTS = 6  #: "File already exists."
ERR_NO_SUCH_USER = 7  #: "No such user."
ERR_OPTION_NEGOTIATION = 8  #: RFC 2347: "terminate the transfer" after an unwanted OACK.

ERROR_MESSAGES = {
    ERR_NOT_DEFINED: "Not defined",
    ERR_FILE_NOT_FOUND: "File not found",
    ERR_ACCESS_VIOLATION: "Access violation",
    ERR_DISK_FULL: "Disk full or allocation exceeded",
    ERR_ILLEGAL_OPERATION: "Illegal TFTP operation",
    ERR_UNKNOWN_TID: "Unknown transfer ID",
    ERR_FILE_EXISTS: "File already exists",
    ERR_NO_SUCH_USER: "No such user",
    ERR_OPTION_NEGOTIATION: "Option negotiation failed",
}

# --- option ranges --------------------------------------------------------------
DEFAULT_BLKSIZE = 512  #: RFC 1350 section 2: "data field from 0 to 512 bytes long"
BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464  #: RFC 2348: "between 8 and 65464 octets, inclusive"
#: 1500-byte Ethernet MTU - 20 (IPv4) - 8 (UDP) - 4 (TFTP header): no IP fragmentation.
PATH_MTU_BLKSIZE = 1468
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255  #: RFC 2349: "between 1 and 255 seconds, inclusive"
WINDOWSIZE_MIN, WINDOWSIZE_MAX = 1, 65535  #: RFC 7440: "between 1 and 65535 blocks, inclusive"

MODES = ("netascii", "octet")  #: RFC 1350 section 5; "mail" is write-only and obsolete.

#: The longest ERROR message we keep from a peer (the rest is dropped, not stored).
MAX_PEER_MESSAGE = 200
