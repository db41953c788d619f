"""gRPC over HTTP/2, the parts that are plain data: message framing, the
`grpc-timeout` header, metadata, and status trailers. Pure functions, no I/O
(grpc's PROTOCOL-HTTP2.md is the reference)."""

from __future__ import annotations

import base64
import struct
import urllib.parse
import zlib
from collections.abc import Iterable, Sequence

import grpc

PREFIX = struct.Struct(">BI")  # compressed flag, message length
# An HTTP/2 frame header: 24-bit length (as 8 + 16 bits), type, flags, stream id.
FRAME_HEADER = struct.Struct(">BHBBL")
DATA = 0x0
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Headers of the protocol itself, not the caller's metadata.
RESERVED = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding",
                      "grpc-accept-encoding", "user-agent", "content-length"})  # fmt: skip
Metadata = tuple[tuple[str, str | bytes], ...]
# Request compression taken, as grpcio's server takes it; answers are not compressed.
ENCODINGS = {"identity": 0, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # zlib wbits
ACCEPT_ENCODING = "identity,deflate,gzip"
# grpc-message: printable ASCII is sent as is, but '%'; the rest percent-encoded.
MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class WireError(Exception):
    """A request the transport cannot take, with the status to answer it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def frame_message(message: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return PREFIX.pack(0, len(message)) + message


def data_frame_header(stream_id: int, length: int) -> bytes:
    """The header of an HTTP/2 DATA frame of `length` bytes, no flags (RFC 9113 4.1)."""
    return FRAME_HEADER.pack(length >> 16, length & 0xFFFF, DATA, 0, stream_id)


class MessageReader:
    """Splits a request body into messages as its bytes arrive. A message
    over `max_bytes` is refused, before it is read whole and, if compressed
    (`encoding`, the call's grpc-encoding), before it is inflated past it."""

    def __init__(self, max_bytes: int, encoding: str = "identity") -> None:
        self.max_bytes = max_bytes
        self.encoding = encoding
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= PREFIX.size:
            compressed, length = PREFIX.unpack_from(self._buf)
            if length > self.max_bytes:
                raise WireError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"SERVER: Received message larger than max ({length} vs. {self.max_bytes})",
                )
            end = PREFIX.size + length
            if len(self._buf) < end:
                break
            message = bytes(self._buf[PREFIX.size : end])
            del self._buf[:end]
            out.append(self._inflate(message) if compressed else message)
        return out

    def _inflate(self, message: bytes) -> bytes:
        wbits = ENCODINGS.get(self.encoding, 0)
        if not wbits:  # PROTOCOL-HTTP2.md: a compressed flag with no encoding
            raise WireError(grpc.StatusCode.INTERNAL,
                            "a compressed message in a call without grpc-encoding")  # fmt: skip
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(message, self.max_bytes + 1)
        except zlib.error as e:
            details = f"could not decompress a {self.encoding} message: {e}"
            raise WireError(grpc.StatusCode.INTERNAL, details) from e
        if len(out) > self.max_bytes:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"SERVER: Received message larger than max (more than {self.max_bytes} bytes "
                f"once decompressed)",
            )
        if not inflater.eof:
            raise WireError(grpc.StatusCode.INTERNAL, f"a truncated {self.encoding} message")
        return out

    @property
    def partial(self) -> bool:
        """Whether bytes of an unfinished message are left over."""
        return bool(self._buf)


def parse_timeout(value: str) -> float:
    """Seconds in a `grpc-timeout` value (at most 8 digits and a unit)."""
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isdigit() and unit in TIMEOUT_UNITS):
        raise WireError(grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {value!r}")
    return int(digits) * TIMEOUT_UNITS[unit]


def request_metadata(headers: Iterable[tuple[str, str]]) -> Metadata:
    """The caller's metadata: no pseudo-headers or protocol headers; `-bin`
    values decoded from base64 (unpadded, as grpc sends them)."""
    out: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if name.startswith(":") or name in RESERVED:
            continue
        if name.endswith("-bin"):
            out.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
        else:
            out.append((name, value))
    return tuple(out)


def metadata_headers(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[tuple[str, str]]:
    """Metadata to send: `-bin` values base64-encoded."""
    out = []
    for name, value in metadata or ():
        key = name.lower()
        if isinstance(value, bytes):
            out.append((key, base64.b64encode(value).decode().rstrip("=")))
        else:
            out.append((key, value))
    return out


def status_headers(code: grpc.StatusCode, details: str | None,
                   metadata: Sequence[tuple[str, str | bytes]] | None = None
                   ) -> list[tuple[str, str]]:  # fmt: skip
    """The trailers that end a call: its status, message and trailing metadata."""
    out = [("grpc-status", str(code.value[0]))]
    if details:
        # Percent-encoded as the protocol asks: printable ASCII but '%' as is.
        out.append(("grpc-message", urllib.parse.quote(details, safe=MESSAGE_SAFE)))
    return out + metadata_headers(metadata)


RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc"),
                    ("grpc-accept-encoding", ACCEPT_ENCODING)]  # fmt: skip
