"""data.txt parsing and streamed JSON / JSONL reading with exact error positions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import data_tools.sources as sources
from data_tools.sources import DataError, RecordIndex, RecordReader, parse_data_txt


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_data_txt_counts_comments_and_paths(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "vl_data.json", "[]")
    write(tmp_path / "text data.jsonl", "")
    other = write(tmp_path.parent / f"{tmp_path.name}-abs" / "vl_data.json", "[]")
    data_txt = write(
        tmp_path / "data.txt",
        "\n".join(
            [
                "# comment line",
                "",
                "sub/vl_data.json 10",
                "text data.jsonl   0.25   # 250 per epoch",
                f"{other} 0.0015",
                "\t",
            ]
        ),
    )
    specs = parse_data_txt(data_txt)
    assert [(s.path, s.epoch_samples, s.line, s.name) for s in specs] == [
        ("sub/vl_data.json", 10_000, 3, "vl_data"),
        ("text data.jsonl", 250, 4, "text_data"),
        (str(other), 2, 5, "vl_data-2"),  # 1.5 rounds half up; same stem gets a suffix
    ]
    assert specs[0].file == (tmp_path / "sub" / "vl_data.json").resolve()


@pytest.mark.parametrize(
    "line, message",
    [
        ("a.json", "expected `<json path> <samples per epoch in thousands>`"),
        ("a.json ten", "'ten' is not a finite number"),
        ("a.json -1", "must be a finite number >= 0"),
        ("a.json nan", "'nan' is not a finite number"),
        ("a.json 1e9999999999", "is not a finite number"),
        ("a.json 1_000", "'1_000' is not a finite number"),
        ("missing.json 1", "missing.json does not exist"),
    ],
)
def test_data_txt_fatal_lines(tmp_path: Path, line: str, message: str) -> None:
    write(tmp_path / "a.json", "[]")
    data_txt = write(
        tmp_path / "data.txt",
        f"a.json 1\n{line}\n" if not line.startswith("a.json ") else f"# first\n{line}\n",
    )
    with pytest.raises(DataError) as e:
        parse_data_txt(data_txt)
    assert f"{data_txt}:2: " in str(e.value)
    assert message in str(e.value)


def test_data_txt_duplicate_and_empty(tmp_path: Path) -> None:
    write(tmp_path / "a.json", "[]")
    with pytest.raises(DataError, match=r"data.txt:3: ./a.json is already listed on line 1"):
        parse_data_txt(write(tmp_path / "data.txt", "a.json 1\n\n./a.json 2\n"))
    with pytest.raises(DataError, match="lists no sources"):
        parse_data_txt(write(tmp_path / "empty.txt", "# nothing\n"))
    with pytest.raises(DataError, match="no such file"):
        parse_data_txt(tmp_path / "nope.txt")


RECORDS = [
    {
        "id": i,
        "conversations": [
            {"from": "human", "value": "q" * (i % 37) + "\nü 你"},
            {"from": "gpt", "value": str(i * 1.5)},
        ],
    }
    for i in range(2000)
]


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
def test_json_array_streams_records_with_their_lines(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    text = json.dumps(RECORDS, indent=2, ensure_ascii=False)
    path = write(tmp_path / "a.json", "\ufeff" + text)  # a BOM is tolerated
    reader = RecordReader(path)
    got = list(reader)
    assert [r for _, _, r in got] == RECORDS
    assert [i for i, _, _ in got] == list(range(len(RECORDS)))
    lines = text.splitlines()
    assert all(lines[line - 1].strip() == "{" for _, line, _ in got)
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jsonl_skips_blank_lines_and_counts_records(tmp_path: Path) -> None:
    body = "\n".join(json.dumps(r) for r in RECORDS[:5])
    path = write(tmp_path / "a.jsonl", body.replace("\n", "\n\n", 1) + "\n")
    got = list(RecordReader(path))
    assert [(i, line) for i, line, _ in got] == [(0, 1), (1, 3), (2, 4), (3, 5), (4, 6)]


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_json_syntax_errors_report_stdlib_line_and_column(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    lines = json.dumps(RECORDS[:300], indent=1).splitlines()
    lines[-20] += " ,"  # a trailing comma near the end
    text = "\n".join(lines)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    with pytest.raises(DataError) as e:
        list(RecordReader(write(tmp_path / "bad.json", text)))
    assert f"bad.json:{ref.value.lineno}:{ref.value.colno}: invalid JSON" in str(e.value)


@pytest.mark.parametrize(
    "text, where",
    [
        ('[{"a": 1}] [', "1:12: invalid JSON: Extra data"),
        ('[{"a": 1} {"b": 2}]', "1:11: invalid JSON: Expecting ',' delimiter or ']'"),
        ('[{"a": 1},\n  {"b": }]', "2:9: invalid JSON: Expecting value"),
        ('[{"a": "unterminated}]', "1:8: invalid JSON: Unterminated string"),
        ("", "1:1: invalid JSON: the file is empty"),
    ],
)
def test_json_array_errors(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(DataError) as e:
        list(RecordReader(write(tmp_path / "x.json", text)))
    assert f"x.json:{where}" in str(e.value)


def test_jsonl_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"x.jsonl:3:2: invalid JSON: Expecting property name .* one JSON object per line"
    ):
        list(RecordReader(write(tmp_path / "x.jsonl", '{"a": 1}\n{"b": 2}\n{oops}\n')))
    with pytest.raises(DataError, match=r"y.jsonl:4:2: invalid JSON"):  # blank lines first count too
        list(RecordReader(write(tmp_path / "y.jsonl", ' \n\n{"a": 1}\n{oops}\n')))


def test_unreadable_values_are_fatal_with_their_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"x.jsonl:2: unreadable JSON value"):
        list(RecordReader(write(tmp_path / "x.jsonl", '{"a": 1}\n{"n": ' + "9" * 5000 + "}\n")))
    with pytest.raises(DataError, match=r"y.json:1:\d+: invalid JSON: unreadable value"):
        list(RecordReader(write(tmp_path / "y.json", "[" + "[" * 100_000 + "]" * 100_000 + "]")))
    with pytest.raises(DataError, match="is not valid UTF-8"):
        parse_data_txt(tmp_path / "latin1.txt") if (tmp_path / "latin1.txt").write_bytes(
            "é 1".encode("latin-1")
        ) else None


def test_a_huge_record_is_read_in_linear_time(tmp_path: Path, monkeypatch) -> None:
    import time

    monkeypatch.setattr(sources, "_CHUNK", 1 << 16)
    blob = "x" * (30 << 20)  # a 30 MB inline data: URI, say
    path = write(tmp_path / "big.json", json.dumps([{"a": blob}, {"b": 1}]))
    start = time.perf_counter()
    records = [r for _, _, r in RecordReader(path)]
    assert records[1] == {"b": 1} and len(records[0]["a"]) == len(blob)
    assert time.perf_counter() - start < 5  # re-parsing per 64 KiB chunk would take minutes


def test_invalid_utf8_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"a": "café"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="byte 11 is not valid UTF-8"):
        list(RecordReader(path))


def test_memory_stays_bounded_on_a_large_jsonl(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "big.jsonl"
    line = json.dumps(RECORDS[7]) + "\n"
    path.write_text(line * 100_000)  # ~9 MB
    tracemalloc.start()
    n = sum(1 for _ in RecordReader(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 100_000
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.1f} MiB file"


# Records that make byte offsets differ from character offsets (Chinese, emoji, a BOM), that span
# many lines, and that hold the characters the reader splits on ("\n" escaped, ",", "]").
ODD = [
    {"id": i, "text": ["你好", "😀 ok", "a,b]", "x\ny", "é"][i % 5] * (i % 4 + 1), "n": [i, {"k": None}]}
    for i in range(300)
]


def index_and_read_back(path: Path) -> tuple[list, RecordIndex, list]:
    """(what the stream yields, the index it built, each record read alone at its span, in a
    shuffled order as conversion reads them, then put back in input order)."""
    reader = RecordReader(path, index=True)
    streamed = list(reader)
    index = reader.index
    assert index.spans.dtype == np.int64 and index.spans.shape == (len(streamed), 3)
    assert [index.line(k) for k in range(len(index))] == [line for _, line, _ in streamed]
    order = np.random.default_rng(0).permutation(len(index))
    back = [None] * len(index)
    with open(path, "rb") as f:
        for k in order:
            back[k] = index.read(f, k)
    return streamed, index, back


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
def test_json_array_index_reads_back_every_record(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    # Elements separated every which way, some indented over many lines, some on one line.
    parts = [json.dumps(r, ensure_ascii=False, indent=2 if i % 3 else None) for i, r in enumerate(ODD)]
    seps = [",", " ,\n\n  ", "\t,", ",\r\n"]
    text = "\ufeff[\n " + "".join(p + seps[i % 4] for i, p in enumerate(parts[:-1])) + parts[-1] + "\n ]\n"
    path = tmp_path / "a.json"
    path.write_bytes(text.encode("utf-8"))
    streamed, index, back = index_and_read_back(path)
    assert [r for _, _, r in streamed] == back == ODD
    raw = path.read_bytes()
    assert [raw[s:e] for s, e, _ in index.spans] == [p.encode() for p in parts]  # exactly the element
    assert [line for _, _, line in index.spans] == [1 + raw.count(b"\n", 0, s) for s, _, _ in index.spans]
    assert index.line(2) == 1 + text.count("\n", 0, text.index(parts[2])) > index.line(1) + 1


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
def test_jsonl_index_reads_back_every_record(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    lines, record_lines = [], []
    for i, r in enumerate(ODD):
        if i % 7 == 0:
            lines.append("  \t")  # a blank line
        lines.append(json.dumps(r, ensure_ascii=i % 2 == 0) + ("\r" if i % 5 == 0 else ""))
        record_lines.append(len(lines))
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\ufeff" + "\n".join(lines)).encode("utf-8"))  # no newline at the end
    streamed, index, back = index_and_read_back(path)
    assert [r for _, _, r in streamed] == back == ODD
    raw = path.read_bytes()
    assert [raw[s:e] for s, e, _ in index.spans] == [lines[n - 1].encode() for n in record_lines]
    assert [line for _, line, _ in streamed] == record_lines


def test_a_file_changed_after_the_scan_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", '{"a": 1}\n{"b": 2}\n')
    reader = RecordReader(path, index=True)
    list(reader)
    path.write_text('{"a": 1}\n{"b"')
    with open(path, "rb") as f, pytest.raises(DataError, match=r"a.jsonl:2: record 1 no longer parses"):
        reader.index.read(f, 1)
