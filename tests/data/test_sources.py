import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.sources import _cut, iter_documents
from lmforge.errors import CorpusError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def test_txt_and_md_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("first file\nsecond line\n", "utf-8")
    (tmp_path / "b.md").write_text("# 标题\n\nmarkdown", "utf-8")
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.md"]))
    assert [d["text"] for d in docs] == ["first file\nsecond line\n", "# 标题\n\nmarkdown"]
    assert docs[0]["id"] == str(tmp_path / "a.txt") and docs[0]["source"] == str(tmp_path / "a.txt")
    assert set(docs[1]) == {"text", "id", "source", "meta"}


def test_jsonl_fields_ids_and_meta(tmp_path):
    rows = [
        {"text": "one", "id": "doc-1", "source": "web", "meta": {"lang": "en"}, "url": "u"},
        {"text": "two"},
        {"text": ""},
        {"text": "three", "id": 0},
    ]
    path = _jsonl(tmp_path / "c.jsonl", rows)
    stats = {}
    docs = list(iter_documents(path, stats=stats))
    assert [d["text"] for d in docs] == ["one", "two", "three"]
    assert docs[0] == {
        "text": "one",
        "id": "doc-1",
        "source": "web",
        "meta": {"lang": "en", "url": "u"},
    }
    assert docs[1]["id"] == f"{path}:2" and docs[1]["source"] == str(path)
    assert docs[2]["id"] == 0
    assert stats["documents"] == 3 and stats["files"] == 1


def test_custom_text_key_and_missing_key_names_line(tmp_path):
    path = _jsonl(tmp_path / "d.json", [{"content": "a"}, {"content": "b"}, {"body": "c"}])
    assert [d["text"] for d in iter_documents(path, text_key="content", skip_bad=True)] == [
        "a",
        "b",
    ]
    with pytest.raises(CorpusError, match=r"d\.json, line 3: no 'content' field \(fields: body\)"):
        list(iter_documents(path, text_key="content"))


def test_malformed_json_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n', "utf-8")
    with pytest.raises(CorpusError, match=r"e\.jsonl, line 3"):
        list(iter_documents(path))
    stats = {}
    assert [d["text"] for d in iter_documents(path, skip_bad=True, stats=stats)] == ["ok"]
    assert stats["skipped_records"] == 1


def test_parquet_streams_rows(tmp_path):
    path = tmp_path / "f.parquet"
    texts = [f"row {i}" for i in range(2500)]
    table = pa.table({"text": texts, "id": [f"r{i}" for i in range(2500)]})
    pq.write_table(table, path, row_group_size=1000)
    docs = list(iter_documents(path))
    assert [d["text"] for d in docs] == texts
    assert docs[1234]["id"] == "r1234"
    with pytest.raises(CorpusError, match=r"no 'body' column \(columns: text, id\)"):
        list(iter_documents(path, text_key="body"))


def test_directory_recursive_sorted_and_glob(tmp_path):
    (tmp_path / "z.txt").write_text("z", "utf-8")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.txt").write_text("b", "utf-8")
    (tmp_path / "sub" / "deeper" / "a.md").write_text("a", "utf-8")
    (tmp_path / "sub" / "notes.csv").write_text("ignored", "utf-8")
    _jsonl(tmp_path / "m.jsonl", [{"text": "m1"}, {"text": "m2"}])
    assert [d["text"] for d in iter_documents(tmp_path)] == ["m1", "m2", "b", "a", "z"]
    assert [d["text"] for d in iter_documents(str(tmp_path / "**" / "*.txt"))] == ["b", "z"]
    # The same file named twice is read once.
    assert [d["text"] for d in iter_documents([tmp_path / "z.txt", str(tmp_path / "*.txt")])] == [
        "z"
    ]


def test_not_utf8_reports_path_and_offset(tmp_path):
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes("héllo ".encode() + b"\xff rest")
    with pytest.raises(CorpusError, match=rf"{bad_txt} is not valid UTF-8: .* offset 7\b"):
        list(iter_documents(bad_txt))
    # In JSONL the bad byte sits after the first 1 MiB read: the offset counts across chunks,
    # and a multi-byte character cut by the chunk boundary is not mistaken for an error.
    good = json.dumps({"text": "a" + "é" * 600_000}, ensure_ascii=False) + "\n"
    data = good.encode() + b'{"text": "x\xc3("}\n'
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(data)
    expected = data.index(b"\xc3(")
    assert expected > 1 << 20
    with pytest.raises(
        CorpusError, match=rf"bad\.jsonl is not valid UTF-8: .* offset {expected}\b"
    ):
        list(iter_documents(bad_jsonl))


def test_truncated_utf8_at_end_of_file(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + "€".encode()[:2])
    with pytest.raises(CorpusError, match="offset 15"):
        list(iter_documents(path))


def test_skip_bad_counts_files(tmp_path):
    (tmp_path / "a.txt").write_text("good", "utf-8")
    (tmp_path / "b.txt").write_bytes(b"\x80bad")
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xfe"}\n')
    stats = {}
    docs = list(iter_documents(tmp_path, skip_bad=True, stats=stats))
    # The JSONL file is rejected as a whole, so none of its lines leak through.
    assert [d["text"] for d in docs] == ["good"]
    assert stats["skipped_files"] == 2
    assert stats["skipped_paths"] == [str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl")]


def test_missing_and_empty(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError, match="no files match"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    (tmp_path / "empty.txt").write_text("", "utf-8")
    _jsonl(tmp_path / "blank.jsonl", [{"text": ""}])
    with pytest.raises(CorpusError, match="is empty"):
        list(iter_documents(tmp_path))
    (tmp_path / "data.csv").write_text("a,b", "utf-8")
    with pytest.raises(CorpusError, match="unsupported file type"):
        list(iter_documents(tmp_path / "data.csv"))


def test_long_text_file_is_cut_at_blank_lines_into_capped_documents(tmp_path):
    paras = [f"paragraph {i} " + "word " * (i % 7 + 3) for i in range(60)]
    text = "\ufeff" + "\n\n".join(paras) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text, "utf-8")
    stats = {}
    docs = list(iter_documents(path, text_max_chars=200, stats=stats))
    assert "".join(d["text"] for d in docs) == text[1:]  # nothing lost, the BOM dropped
    assert all(len(d["text"]) <= 200 for d in docs) and len(docs) > 10
    # Every piece but the last ends with a blank line, and is at least half the limit.
    assert all(d["text"].endswith("\n\n") and len(d["text"]) >= 100 for d in docs[:-1])
    assert [d["id"] for d in docs[:2]] == [str(path), f"{path}#1"]
    assert {d["source"] for d in docs} == {str(path)} and stats["split_text_files"] == 1
    # Within the limit: one document, as before.
    assert [d["text"] for d in iter_documents(path, text_max_chars=len(text))] == [text[1:]]
    with pytest.raises(CorpusError, match="text_max_chars must be >= 1"):
        list(iter_documents(path, text_max_chars=0))


def test_cut_prefers_blank_line_then_line_break_then_the_limit():
    assert _cut("a" * 60 + "\n\n" + "b" * 20 + "\n" + "c" * 40, 100) == 62  # blank line
    assert _cut("a" * 60 + "\n" + "b" * 60, 100) == 61  # no blank line: the line break
    assert _cut("a\n\n" + "b" * 200, 100) == 100  # only a blank line in the first half: at 100
    assert _cut("x" * 300, 100) == 100


def test_huge_single_line_text_file_is_streamed_not_held(tmp_path):
    # 24 MB on one line (multi-byte characters across read boundaries): peak Python memory while
    # iterating stays a few times the 1M-character cap, not the file's size.
    path = tmp_path / "one_line.txt"
    unit = "abcdefghé数据" * 1000
    with path.open("w", encoding="utf-8") as f:
        for _ in range(1800):
            f.write(unit)
    size = path.stat().st_size
    assert size > 20_000_000
    tracemalloc.start()
    n = chars = 0
    for d in iter_documents(path):
        n += 1
        chars += len(d["text"])
        assert len(d["text"]) <= 1_000_000
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert chars == len(unit) * 1800 and n == -(-chars // 1_000_000)
    assert peak < 16_000_000, peak  # a 1M-character str of CJK text is 4 MB (UCS-4)
