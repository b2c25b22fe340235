"""The YAML pipeline end to end through the CLI: outputs, stats, rejects, resume, task i of N,
streaming memory and error messages."""

import json
import random
import tracemalloc

import pytest
import yaml

from lmforge.cli import main
from lmforge.data.pipeline import PipelineConfig, build_steps, process
from lmforge.errors import ConfigError

PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. Members agreed that "
    "the library should have longer opening hours, and that the park needs new benches. After a "
    "short debate, they voted to fund both projects with the money saved on energy {i}."
)
WORDS = [
    "river",
    "town",
    "rain",
    "school",
    "night",
    "budget",
    "park",
    "library",
    "energy",
    "debate",
    "summer",
    "bench",
]


def _text(k: int) -> str:
    """Distinct prose per k: shuffled words with stop words, far from every other document."""
    rng = random.Random(k)
    return " ".join(rng.choice(WORDS) + " of the" for _ in range(40)) + "."


def _write_inputs(root, n_files=4, per_file=6):
    root.mkdir()
    for f in range(n_files):
        with (root / f"part{f}.jsonl").open("w") as out:
            for i in range(per_file):
                k = f * per_file + i
                text = _text(k) + f" Contact person{k}@example.com for details."
                if k % 5 == 0:
                    text = PROSE.format(i=0)  # exact duplicates of document 0 across files
                out.write(json.dumps({"text": text, "id": f"f{f}-{i}"}) + "\n")
            out.write("{not json\n")
            out.write(json.dumps({"body": "no text field"}) + "\n")
    return root


STEPS = ["pii", {"gopher_quality": {"min_words": 20}}, "exact_dedup", "minhash_dedup"]


def _config(tmp_path, inputs, out="out", **kw):
    path = tmp_path / f"{out}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"input": [str(inputs)], "output": str(tmp_path / out), "steps": STEPS, **kw}
        )
    )
    return path


def _outputs(out):
    return {p.name: p.read_text() for p in sorted((out / "data").iterdir())}


def test_cli_end_to_end_stats_rejects(tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in")
    assert main(["data", "process", str(_config(tmp_path, inputs))]) == 0
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    docs = [json.loads(line) for text in _outputs(out).values() for line in text.splitlines()]
    assert stats["input"]["bad_records_skipped"] == 8  # 2 per file: counted, never silent
    assert stats["steps"]["0:pii"]["counts"]["pii_EMAIL"] == 19
    assert all("@" not in d["text"] for d in docs)
    # 24 docs; ids 0,5,10,15,20 have identical text; every other document is distinct.
    assert stats["steps"]["2:exact_dedup"]["reasons"]["exact_duplicate"] == 4
    assert stats["steps"]["3:minhash_dedup"]["docs_out"] == 20
    assert stats["output_documents"] == len(docs) == 20
    rejects = [
        json.loads(line) for p in (out / "rejects").iterdir() for line in p.read_text().splitlines()
    ]
    assert {(r["step"], r["reason"]) for r in rejects} == {("2:exact_dedup", "exact_duplicate")}
    md = (out / "stats.md").read_text()
    assert "| 2:exact_dedup | " in md and "exact_duplicate 4" in md


def test_resume_after_kill_gives_identical_output(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    assert main(["data", "process", str(_config(tmp_path, inputs, "a"))]) == 0
    assert main(["data", "process", str(_config(tmp_path, inputs, "b"))]) == 0
    b = tmp_path / "b"
    # Simulate a kill in the last phase: two shards never finished (their stats are written last).
    for shard in ("00001", "00003"):
        (b / "work" / "phase2" / f"{shard}.stats.json").unlink()
        (b / "data" / f"{shard}.jsonl").write_text("partial garbage")
    (b / "stats.json").unlink()
    assert main(["data", "process", str(_config(tmp_path, inputs, "b"))]) == 0
    assert _outputs(tmp_path / "a") == _outputs(b)


def test_task_i_of_n_partitions_shards_and_matches_single_task(tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    assert main(["data", "process", str(_config(tmp_path, inputs, "one"))]) == 0
    cfg = _config(tmp_path, inputs, "split", tasks=2)
    assert main(["data", "process", str(cfg), "--task=0"]) == 0  # waits for task 1's shards
    split = tmp_path / "split"
    assert sorted(p.name for p in (split / "work" / "phase0").glob("*.stats.json")) == [
        "00000.stats.json",
        "00002.stats.json",
    ]
    assert not (split / "stats.json").exists()
    # A scheduler reruns waiting tasks; three phases here (two corpus-level steps).
    for task in (1, 0, 1, 0):
        assert main(["data", "process", str(cfg), f"--task={task}"]) == 0
    assert (split / "stats.json").exists()
    assert _outputs(tmp_path / "one") == _outputs(split)


def test_parallel_workers_and_parquet_output(tmp_path):
    import pyarrow.parquet as pq

    inputs = _write_inputs(tmp_path / "in")
    assert (
        main(
            ["data", "process", str(_config(tmp_path, inputs, "par", workers=2, format="parquet"))]
        )
        == 0
    )
    rows = sum(pq.read_table(p).num_rows for p in (tmp_path / "par" / "data").iterdir())
    assert rows == json.loads((tmp_path / "par" / "stats.json").read_text())["output_documents"]


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(
        ConfigError,
        match=r"steps\[1\]: unknown step 'gopher_qualty'; did you mean 'gopher_quality'",
    ):
        build_steps(["pii", "gopher_qualty"])
    with pytest.raises(
        ConfigError,
        match=r"steps\[0\] \(minhash_dedup\): unknown parameter 'bucket'; did you mean 'buckets'",
    ):
        build_steps([{"minhash_dedup": {"bucket": 10}}])
    inputs = _write_inputs(tmp_path / "in")
    cfg = _config(tmp_path, inputs, on_bad_record="stop")
    assert main(["data", "process", str(cfg)]) == 1
    assert "line 7" in capsys.readouterr().err
    # An existing output with another configuration needs --overwrite; inputs are never outputs.
    cfg = _config(tmp_path, inputs, "o2")
    assert main(["data", "process", str(cfg)]) == 0
    other = _config(tmp_path, inputs, "o2", examples=1)
    assert main(["data", "process", str(other)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "process", str(other), "--overwrite"]) == 0
    with pytest.raises(ConfigError, match="contains the input file"):
        process(
            PipelineConfig(
                input=[str(inputs)], output=str(inputs.parent), steps=["pii"], overwrite=True
            )
        )
    assert (inputs / "part0.jsonl").exists()


def test_streaming_memory_does_not_grow_with_file_size(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    line = json.dumps({"text": PROSE.format(i=0) * 20}) + "\n"  # ~4 kB per document
    with (big / "big.jsonl").open("w") as f:
        for _ in range(3000):  # ~12 MB
            f.write(line)
    tracemalloc.start()
    process(
        PipelineConfig(input=[str(big)], output=str(tmp_path / "o"), steps=["pii"], rejects=False)
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4_000_000, peak  # a third of the file: documents are streamed one at a time


def test_max_chars_rejects_huge_documents(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text(
        json.dumps({"text": "x" * 100_000}) + "\n" + json.dumps({"text": "small"}) + "\n"
    )
    stats = process(
        PipelineConfig(input=[str(d)], output=str(tmp_path / "o"), steps=["pii"], max_chars=10_000)
    )
    assert stats["input"]["too_long"] == 1 and stats["output_documents"] == 1


def test_minhash_verification_rereads_shards_in_the_pipeline(tmp_path):
    # Across two input files: a copy at 5-gram Jaccard 0.8 (4 substitutions 20 words apart in 184
    # words: 160/200) and one at 0.9 (2 in 194: 180/200). Both are LSH candidates at 14x8;
    # verification re-reads the phase output and keeps the 0.8 copy.
    a = [f"a{i}" for i in range(184)]
    b = [f"b{i}" for i in range(194)]
    a80, b90 = list(a), list(b)
    for j in range(4):
        a80[10 + 20 * j] = f"x{j}"
    for j in range(2):
        b90[10 + 20 * j] = f"y{j}"
    root = tmp_path / "in"
    root.mkdir()
    for name, texts in (("p0", [a, b]), ("p1", [a80, b90])):
        (root / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"text": " ".join(t), "id": f"{name}-{i}"}) + "\n"
                for i, t in enumerate(texts)
            )  # fmt: skip
        )
    for verify, kept in ((True, ["p0-0", "p0-1", "p1-0"]), (False, ["p0-0", "p0-1"])):
        out = tmp_path / f"out{verify}"
        config = PipelineConfig(
            input=[str(root)], output=str(out), steps=[{"minhash_dedup": {"verify": verify}}]
        )
        stats = process(config)
        docs = [json.loads(line) for text in _outputs(out).values() for line in text.splitlines()]
        assert [d["id"] for d in docs] == kept
        decision = stats["decisions"]["0:minhash_dedup"]
        assert decision["candidate_pairs"] == 2
        assert decision["rejected_pairs"] == (1 if verify else 0)
