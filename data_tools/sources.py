"""Reading what the user gives: the data.txt source list and the JSON/JSONL files it names.

data.txt is the InternLM-XComposer format, one source a line:

    # path                          samples per epoch, in thousands
    data/llava_mix665k.json         665
    /abs/path/text_only.jsonl       0.25     # 250 samples per epoch

JSON arrays and JSONL files are streamed record by record, so memory does not grow with the
file; a syntax error is reported with its file, line and column. The stream can also note where
each record lies in the file (`RecordIndex`), so a later pass can read the records in any order
by seeking to them.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, DecimalException, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_CHUNK = 1 << 20
_MAX_RECORD_CHARS = 256 << 20  # one record bigger than this is surely a malformed file


class DataError(Exception):
    """Input that cannot be converted at all: the run stops and names the file and line."""


@dataclass(frozen=True)
class SourceSpec:
    path: str  # as written in data.txt
    file: Path  # resolved
    epoch_samples: int  # round(thousands * 1000)
    line: int  # line in data.txt, for messages
    name: str  # output directory and shard prefix, unique within a run


def parse_data_txt(data_txt: str | Path) -> list[SourceSpec]:
    """Parse a data.txt; every problem is a DataError naming the line."""
    data_txt = Path(data_txt)
    if not data_txt.is_file():
        raise DataError(f"{data_txt}: no such file (the data.txt listing `<json path> <thousands>` lines)")
    specs: list[SourceSpec] = []
    seen: dict[Path, int] = {}
    names: set[str] = set()
    try:
        text = data_txt.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{data_txt}: byte {e.start} is not valid UTF-8; save the file as UTF-8") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        fields = line.rsplit(None, 1)
        where = f"{data_txt}:{lineno}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected `<json path> <samples per epoch in thousands>`, got {raw!r}")
        path, number = fields
        try:
            if "_" in number:
                raise InvalidOperation
            thousands = Decimal(number)
            epoch = int((thousands * 1000).to_integral_value(rounding=ROUND_HALF_UP))
        except (DecimalException, OverflowError, ValueError):  # nan, inf, 1e9999999999, 1_000
            raise DataError(
                f"{where}: {number!r} is not a finite number; write the samples per epoch in thousands, "
                f"e.g. `{path} 0.5` for 500"
            ) from None
        if thousands < 0:
            raise DataError(f"{where}: samples per epoch must be a finite number >= 0, got {number!r}")
        file = Path(path) if Path(path).is_absolute() else data_txt.parent / path
        file = Path(file.resolve())
        if file in seen:
            raise DataError(
                f"{where}: {path} is already listed on line {seen[file]}; list each file once "
                f"and add up its counts"
            )
        if not file.is_file():
            raise DataError(f"{where}: {path} does not exist (resolved to {file})")
        seen[file] = lineno
        name = _unique_name(_safe_name(file.stem), names)
        specs.append(SourceSpec(path=path, file=file, epoch_samples=epoch, line=lineno, name=name))
    if not specs:
        raise DataError(f"{data_txt}: lists no sources; add lines `<json path> <thousands>`")
    return specs


def _safe_name(stem: str) -> str:
    # Source names become directory names and tar keys' prefixes: no dots, no slashes.
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return name or "source"


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


@dataclass(frozen=True)
class RecordIndex:
    """Where each record of a JSON array or JSONL file lies: rows of (start byte, end byte, line),
    in input order. 24 bytes a record: enough to read any record alone, without holding them."""

    file: Path
    spans: np.ndarray  # int64, shape (records, 3)

    def __len__(self) -> int:
        return len(self.spans)

    def line(self, k: int) -> int:
        return int(self.spans[k, 2])

    def read(self, f: BinaryIO, k: int) -> Any:
        """Record `k` (its input index), read from `f`: this file, opened "rb"."""
        start, end, line = (int(x) for x in self.spans[k])
        f.seek(start)
        try:
            return json.loads(f.read(end - start).decode("utf-8"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
            raise DataError(
                f"{self.file}:{line}: record {k} no longer parses ({e}); the file changed "
                f"after it was scanned: let it be while converting, and run again"
            ) from None


class RecordReader:
    """Streams the records of a JSON array or JSONL file, hashing the bytes as it goes.

    Iterating yields `(index, line, record)`; `sha256` is complete once iteration ends, and so is
    `index` with `RecordReader(file, index=True)`.
    A file whose first character is `[` is a JSON array, anything else is JSONL.
    """

    def __init__(self, file: str | Path, index: bool = False) -> None:
        self.file = Path(file)
        self._hash = hashlib.sha256()
        self._spans: array[int] | None = array("q") if index else None  # start, end, line, ...

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def index(self) -> RecordIndex:
        assert self._spans is not None, "only RecordReader(file, index=True) notes the spans"
        return RecordIndex(self.file, np.array(self._spans, dtype=np.int64).reshape(-1, 3))

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        if self._spans is not None:
            self._spans = array("q")
        with open(self.file, "rb") as f:
            text = _TextStream(f, self._hash, self.file)
            first = text.peek_nonspace()
            jsonl = self.file.suffix.lower() == ".jsonl"
            if first == "" and not jsonl:
                raise DataError(f"{self.file}:1:1: invalid JSON: the file is empty; remove it from data.txt")
            records = self._iter_array(text) if first == "[" and not jsonl else self._iter_lines(text)
            for index, (line, start, end, record) in enumerate(records):
                if self._spans is not None:
                    self._spans.extend((start, end, line))
                yield index, line, record

    def _iter_lines(self, text: _TextStream) -> Iterator[tuple[int, int, int, Any]]:
        """(line, start byte, end byte, record) of each non-blank line."""
        for lineno, line, start, end in text.lines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{self.file}:{lineno}:{e.colno}: invalid JSON: {e.msg} "
                    f"(a JSONL file holds one JSON object per line)"
                ) from None
            except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting 100k deep
                raise DataError(f"{self.file}:{lineno}: unreadable JSON value: {e}") from None
            yield lineno, start, end, record

    def _iter_array(self, text: _TextStream) -> Iterator[tuple[int, int, int, Any]]:
        """(line, start byte, end byte, record) of each element."""
        decoder = json.JSONDecoder()
        text.expect("[")
        index = 0
        while True:
            ch = text.peek_nonspace()
            if ch == "]" and index == 0:
                text.advance(1)
                break
            if index > 0:
                if ch == "]":
                    text.advance(1)
                    break
                if ch != ",":
                    text.fail("Expecting ',' delimiter or ']'")
                text.advance(1)
                text.peek_nonspace()
            line, start = text.line_at(), text.byte_at()
            record = text.decode_value(decoder)
            yield line, start, text.byte_at(), record
            index += 1
        if text.peek_nonspace() != "":
            text.fail("Extra data after the closing ']'")


class _TextStream:
    """A growing window of decoded text over a binary file, with absolute line/column/byte."""

    def __init__(self, f: BinaryIO, hasher: Any, file: Path) -> None:
        self._f, self._hash, self._file = f, hasher, file
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._bytes_read = 0
        self._lines = 0  # newlines before self._counted, dropped text included
        self._counted = 0
        self._col_before = 0  # characters after the last dropped newline
        # The file offset of self._buf[self._measured]; the decoder drops a BOM, so count it here.
        self._offset = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        self._measured = 0
        f.seek(0)

    def _read(self, size: int = 0) -> bool:
        if self._eof:
            return False
        chunk = self._f.read(size or _CHUNK)
        self._hash.update(chunk)
        try:
            self._buf += self._decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self._file}: byte {self._bytes_read + e.start} is not valid UTF-8; save the file as UTF-8"
            ) from None
        self._bytes_read += len(chunk)
        self._eof = not chunk
        return True

    def _compact(self) -> None:
        if self._pos > _CHUNK:
            self.line_at(self._pos)
            nl = self._buf.rfind("\n", 0, self._pos)
            self._col_before = self._pos - nl - 1 if nl >= 0 else self._col_before + self._pos
            self._drop()
            self._counted = 0

    def _drop(self) -> None:
        """Forget the text before the current position."""
        self.byte_at(self._pos)
        self._buf, self._pos, self._measured = self._buf[self._pos :], 0, 0

    def byte_at(self, pos: int | None = None) -> int:
        """The file offset of the character at `pos`. The text was decoded from valid UTF-8, so
        encoding it again gives back the file's bytes; positions only move forward, so each
        character is encoded once."""
        pos = self._pos if pos is None else pos
        assert pos >= self._measured, (pos, self._measured)
        self._offset += len(self._buf[self._measured : pos].encode("utf-8"))
        self._measured = pos
        return self._offset

    def line_at(self, pos: int | None = None) -> int:
        # Positions only move forward, so newlines are counted once, incrementally.
        pos = self._pos if pos is None else pos
        if pos >= self._counted:
            self._lines += self._buf.count("\n", self._counted, pos)
            self._counted = pos
            return self._lines + 1
        return self._lines - self._buf.count("\n", pos, self._counted) + 1

    def _col_at(self, pos: int) -> int:
        nl = self._buf.rfind("\n", 0, pos)
        if nl >= 0:
            return pos - nl
        return self._col_before + pos + 1

    def fail(self, msg: str, pos: int | None = None) -> None:
        pos = self._pos if pos is None else pos
        raise DataError(f"{self._file}:{self.line_at(pos)}:{self._col_at(pos)}: invalid JSON: {msg}")

    def peek_nonspace(self) -> str:
        """Skip whitespace; return the next character, '' at the end of the file."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in " \t\r\n":
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            self._compact()
            if not self._read():
                return ""

    def expect(self, ch: str) -> None:
        if self.peek_nonspace() != ch:
            self.fail(f"Expecting {ch!r}")
        self._pos += 1

    def advance(self, n: int) -> None:
        self._pos += n

    def decode_value(self, decoder: json.JSONDecoder) -> Any:
        while True:
            try:
                value, end = decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as e:
                # Usually the window ends inside this record: read more and try again, doubling
                # the read so a record of many megabytes is not re-parsed once per chunk.
                if self._eof or len(self._buf) - self._pos > _MAX_RECORD_CHARS:
                    self.fail(e.msg, e.pos)
                self._compact()
                self._read(max(_CHUNK, len(self._buf) - self._pos))
                continue
            except (ValueError, RecursionError) as e:
                self.fail(f"unreadable value ({e})")
            if end == len(self._buf) and not self._eof:
                # A number or literal cut at the window's end decodes "successfully"; make sure.
                self._read()
                continue
            self._pos = end
            return value

    def lines(self) -> Iterator[tuple[int, str, int, int]]:
        """(line number, text, start byte, end byte) of each line, its newline left out."""
        lineno = self.line_at()  # not 1: peeking at the first character skipped blank lines
        while True:
            nl = self._buf.find("\n", self._pos)
            while nl < 0 and self._read():
                nl = self._buf.find("\n", self._pos)
            if nl < 0:
                rest = self._buf[self._pos :]
                if rest:
                    yield lineno, rest, self.byte_at(), self.byte_at(len(self._buf))
                return
            yield lineno, self._buf[self._pos : nl], self.byte_at(), self.byte_at(nl)
            self._pos = nl + 1
            lineno += 1
            if self._pos > _CHUNK:
                self._drop()
