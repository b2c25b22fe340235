import itertools
import json
import subprocess
import sys

import pytest

from lmforge.data.default_corpus import default_documents


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Write the corpus in a fresh interpreter, which also shows the modules it had to import."""
    path = tmp_path_factory.mktemp("corpus") / "sub" / "corpus.jsonl"
    code = (
        "import json, sys\n"
        "from lmforge.data.default_corpus import write_default_corpus\n"
        "before = set(sys.modules)\n"
        f"print(write_default_corpus({str(path)!r}))\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    returned, modules = result.stdout.splitlines()
    docs = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    return path, returned, json.loads(modules), docs


def test_size_and_shape(written):
    *_, docs = written
    assert sum(len(d["text"].encode()) for d in docs) > 1_500_000
    # One document per pydoc topic and per stdlib module with docstrings.
    assert len(docs) > 500
    assert all(d["text"].strip() and set(d) == {"text", "id", "source", "meta"} for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)


def test_contents(written):
    from pydoc_data.topics import topics

    by_id = {d["id"]: d for d in written[-1]}
    assert by_id["pydoc:assert"]["text"] == topics["assert"]
    assert sum(d["source"] == "pydoc_data" for d in by_id.values()) == len(topics)
    json_doc = by_id["stdlib:json/__init__.py"]["text"]
    assert json_doc.startswith("JSON (JavaScript Object Notation)")
    # Class and function docstrings follow the module's, in source order.
    serialize = json_doc.index("Serialize ``obj`` as a JSON formatted stream")
    assert serialize < json_doc.index("Deserialize ``s``")
    assert not any(part in d for d in by_id for part in ("/test/", "site-packages", "idlelib/"))


def test_deterministic(written):
    assert list(itertools.islice(default_documents(), 50)) == written[-1][:50]


def test_imports_no_stdlib_modules(written):
    _, _, modules, _ = written
    # Only data: sysconfig's generated table, codecs named by coding cookies, and the topics.
    harmless = ("_sysconfigdata", "encodings.", "pydoc_data")
    assert [m for m in modules if not m.startswith(harmless)] == []
    assert "pydoc_data.topics" in modules


def test_write_is_atomic_and_returns_path(written):
    path, returned, _, _ = written
    assert returned == str(path)
    assert list(path.parent.iterdir()) == [path]
