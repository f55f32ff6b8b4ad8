"""An incremental newline-delimited JSON line splitter: bytes in, lines out, no I/O.

The rule of this module: how a byte stream is cut into chunks never changes the lines it
yields. A line ends at LF; a CR just before the LF is dropped (CRLF); blank lines (only ASCII
whitespace) are skipped. Lines are split on bytes, where LF can never be part of a multi-byte
UTF-8 character, and returned as bytes for the JSON parser to decode.

Memory is bounded: a line longer than ``max_line`` bytes raises :class:`NDJSONError`, so a peer
that never sends a newline cannot make the splitter buffer without end. Each byte is scanned
for LF once, however small the chunks of a long line are.
"""

from __future__ import annotations

__all__ = ["NDJSONError", "NDJSONSplitter"]


class NDJSONError(ValueError):
    """The byte stream broke the splitter's bound (a line too long)."""


class NDJSONSplitter:
    """Feed bytes with :meth:`feed`; get the lines completed by them. At the end of the stream,
    :meth:`close` returns the last line if it was not ended by a newline."""

    def __init__(self, *, max_line: int = 4 << 20) -> None:
        self.max_line = max_line
        self._buf = bytearray()  # the incomplete last line
        self._scanned = 0  # bytes of ``_buf`` already known to hold no LF

    @property
    def pending(self) -> bool:
        """Whether non-blank bytes of an unfinished line are buffered."""
        return bool(self._buf.strip())

    def feed(self, chunk: bytes) -> list[bytes]:
        """Split the next bytes of the stream; return the lines they complete, in order."""
        buf = self._buf
        buf += chunk
        lines: list[bytes] = []
        start = 0
        while (end := buf.find(b"\n", self._scanned)) != -1:
            self._line(bytes(buf[start:end]), lines)
            start = self._scanned = end + 1
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self.max_line:
            raise NDJSONError(f"a line is longer than {self.max_line} bytes")
        return lines

    def close(self) -> list[bytes]:
        """End of the stream: the unterminated last line, if any (then the splitter is empty)."""
        lines: list[bytes] = []
        self._line(bytes(self._buf), lines)
        self._buf.clear()
        self._scanned = 0
        return lines

    def _line(self, line: bytes, lines: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            raise NDJSONError(f"a line is longer than {self.max_line} bytes")
        if line.strip():
            lines.append(line)
