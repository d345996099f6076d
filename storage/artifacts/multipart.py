"""An incremental ``multipart/form-data`` parser with bounded memory.

Fed the body in arbitrary pieces (``feed``); form fields (small, capped) are
collected into ``fields`` and the content of the first part with a filename
is handed to ``on_file`` piece by piece, never held whole.  Later file
parts are skipped, as upstream reads only the first.  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from email.message import Message

from storage.errors import InvalidAPIParameters

MAX_HEADERS = 16 << 10
MAX_FIELD = 64 << 10
MAX_PREAMBLE = 64 << 10

_PREAMBLE, _HEADERS, _BODY, _AFTER, _END = range(5)


def boundary_of(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None."""
    msg = Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        return None
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        return None
    return boundary


def _bad(message: str) -> InvalidAPIParameters:
    return InvalidAPIParameters(f"malformed multipart body: {message}")


def _head(buf: bytearray, n: int) -> bytes:
    """``bytes(buf[:n])`` with one copy, not two."""
    with memoryview(buf) as view:
        return bytes(view[:n])


class MultipartParser:
    def __init__(self, boundary: str, on_file_start: Callable[[dict[str, str], str], None],
                 on_file: Callable[[bytes], None]) -> None:
        self.first = b"--" + boundary.encode("latin-1")
        self.delimiter = b"\r\n" + self.first
        self.on_file_start = on_file_start
        self.on_file = on_file
        self.fields: dict[str, str] = {}
        self.state = _PREAMBLE
        self.buf = bytearray()
        self.file_seen = False
        self.file_done = False
        self._part_kind = ""  # "field", "file" or "skip"
        self._part_name = ""
        self._field = bytearray()

    @property
    def complete(self) -> bool:
        return self.state == _END

    def feed(self, data: bytes) -> None:
        if self.state == _END:
            return  # the epilogue is ignored
        self.buf += data
        while True:
            if self.state == _PREAMBLE:
                # The first boundary may start the body or follow a CRLF.
                i = self.buf.find(self.first)
                if i < 0:
                    if len(self.buf) > MAX_PREAMBLE:
                        raise _bad("no boundary found")
                    return
                del self.buf[:i + len(self.first)]
                self.state = _AFTER
            elif self.state == _AFTER:
                if len(self.buf) < 2:
                    return
                if self.buf[:2] == b"--":
                    self.state = _END
                    self.buf.clear()
                    return
                # Transport padding (spaces, tabs) may precede the CRLF.
                j = self.buf.find(b"\r\n")
                if j < 0:
                    if len(self.buf) > 1024:
                        raise _bad("no line break after a boundary")
                    return
                if self.buf[:j].strip(b" \t"):
                    raise _bad("garbage after a boundary")
                del self.buf[:j + 2]
                self.state = _HEADERS
            elif self.state == _HEADERS:
                j = self.buf.find(b"\r\n\r\n")
                if j < 0:
                    if self.buf.startswith(b"\r\n"):
                        j = -2  # a part without headers
                    elif len(self.buf) > MAX_HEADERS:
                        raise _bad("part headers too long")
                    else:
                        return
                raw = bytes(self.buf[:j]) if j >= 0 else b""
                del self.buf[:j + 4]
                self._start_part(raw)
                self.state = _BODY
            elif self.state == _BODY:
                i = self.buf.find(self.delimiter)
                if i < 0:
                    keep = len(self.delimiter) - 1
                    if len(self.buf) > keep:
                        cut = len(self.buf) - keep
                        self._part_data(_head(self.buf, cut))
                        del self.buf[:cut]
                    return
                self._part_data(_head(self.buf, i))
                del self.buf[:i + len(self.delimiter)]
                self._end_part()
                self.state = _AFTER
            else:
                return

    def _start_part(self, raw: bytes) -> None:
        msg = Message()
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                msg[name.strip()] = value.strip()
        param = msg.get_param("name", header="content-disposition")
        filename = msg.get_param("filename", header="content-disposition")
        self._part_name = param if isinstance(param, str) else ""
        if filename is not None:
            if self.file_seen:
                self._part_kind = "skip"
                return
            self.file_seen = True
            self._part_kind = "file"
            self.on_file_start(dict(self.fields), str(msg.get("content-type") or ""))
        elif self.file_seen:
            self._part_kind = "skip"  # fields after the file cannot change where it went
        else:
            self._part_kind = "field"
            self._field = bytearray()

    def _part_data(self, data: bytes) -> None:
        if not data:
            return
        if self._part_kind == "file":
            self.on_file(data)
        elif self._part_kind == "field":
            self._field += data
            if len(self._field) > MAX_FIELD:
                raise _bad(f"form field {self._part_name!r} is longer than {MAX_FIELD} bytes")

    def _end_part(self) -> None:
        if self._part_kind == "file":
            self.file_done = True
        elif self._part_kind == "field" and self._part_name:
            try:
                self.fields[self._part_name] = self._field.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"form field {self._part_name!r} is not UTF-8") from None
        self._part_kind = ""
