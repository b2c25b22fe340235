"""The runs browser's JSON API (`lmforge ui`, lmforge/web/runs.py) against a real uvicorn server:
listing and reading runs, the curves of a huge metrics.jsonl, corrupt and missing files, paths
that try to leave RUNS_DIR, the API key, and that nothing in the runs folder is ever written.

The run folders are synthetic, laid out as `lmforge run`, `pretrain`, `sft`, `dpo`, `eval` and
`data process` write them (the UI tests import the builders from here).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmforge.cli import main
from lmforge.web.runs import create_runs_app

# A valid 1x1 PNG: report.md shows loss.png.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
SECRET = "top-secret-outside-the-runs-dir"


def write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def train_metrics(steps: int, lr: float, val_every: int = 10) -> list[dict]:
    out = []
    for i in range(1, steps + 1):
        record = {
            "step": i,
            "loss": 5.0 - 3.0 * i / steps,
            "lr": lr * min(1.0, i / 5),
            "grad_norm": 1.0 + (i % 7) / 7,
            "tokens": 128 * i,
            "tok_per_s": 50_000.0 + i,
            "elapsed": 0.01 * i,
        }
        if i % val_every == 0:
            record["val_loss"] = 5.2 - 3.0 * i / steps
        out.append(record)
    return out


def eval_dir(path: Path, tasks: dict[str, int], task_name=str, prediction=None) -> None:
    """results.json + samples.jsonl of the harness: multiple-choice items per task."""
    results, samples = {}, []
    for task, n in tasks.items():
        name = task_name(task)
        results[name] = {"n": n, "acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25}
        for i in range(n):
            samples.append(
                {
                    "task": name,
                    "index": i,
                    "prompt": f"{task} question {i}?\nAnswer:",
                    "choices": [f"right {i}", prediction or f"wrong {i}"],
                    "gold": [0],
                    "pred": i % 2,
                    "scores": {"acc": float(i % 2 == 0)},
                }
            )
    write_json(path / "results.json", {"results": results, "config": {"limit": 12, "shots": 0}})
    write_jsonl(path / "samples.jsonl", samples)


def make_full_run(path: Path, steps: int = 40, lr: float = 0.01) -> Path:
    """An `lmforge run` folder: pre-training, sft/, align/, eval/, data/out/ and report.md."""
    path.mkdir(parents=True)
    (path / "run.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "steps": steps}}))
    write_json(path / "summary.json", {"steps": steps, "final_val_loss": 2.2, "tokens_seen": 5120})
    write_jsonl(path / "metrics.jsonl", train_metrics(steps, lr))
    (path / "report.md").write_text(
        "# lmforge run\n\n| | |\n|---|---|\n| optimizer steps | 40 |\n\n"
        "## Loss\n\n![loss curves](loss.png)\n"
    )
    (path / "loss.png").write_bytes(PNG)
    sft = path / "sft"
    sft.mkdir()
    (sft / "sft.yaml").write_text("method: full\ntrain:\n  lr: 0.001\n")
    write_json(sft / "sft.json", {"exact_match_after": 0.5, "config": {"method": "full"}})
    write_jsonl(sft / "metrics.jsonl", train_metrics(20, 0.001))
    sample = {"task": "comparison", "question": "Which is larger, 3 or 4?", "gold": "4"}
    write_jsonl(sft / "samples.jsonl", [{**sample, "output": " 4", "correct": True}])
    align = path / "align"
    align.mkdir()
    (align / "dpo.yaml").write_text("beta: 0.5\n")
    write_json(align / "dpo.json", {"held_out_pairs": {"reward_accuracy": 0.8}})
    write_jsonl(
        align / "metrics.jsonl",
        [{"step": i, "loss": 0.7 - i / 100, "reward_accuracy": i / 30} for i in range(1, 31)],
    )
    eval_dir(path / "eval", {"reading": 12, "cloze": 7})
    pii = {"docs_in": 60, "docs_out": 60, "chars_in": 1000, "chars_out": 990, "reasons": {}}
    dedup = {"docs_in": 60, "docs_out": 52, "chars_in": 990, "chars_out": 870}
    removed = [{"id": "d7", "reason": "duplicate", "text": "the same text"}]
    steps = {
        "0:pii": {**pii, "counts": {"email": 3}, "examples": []},
        "1:exact_dedup": {**dedup, "reasons": {"duplicate": 8}, "counts": {}, "examples": removed},
    }
    stats = {"input_shards": 1, "input": {"bad_records_skipped": 2}, "steps": steps}
    write_json(path / "data" / "out" / "stats.json", {**stats, "output_documents": 52})
    return path


def make_pretrain_run(path: Path, steps: int = 25, lr: float = 0.003) -> Path:
    path.mkdir(parents=True)
    (path / "run.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "steps": steps}}))
    write_jsonl(path / "metrics.jsonl", train_metrics(steps, lr, val_every=5))
    return path


def make_broken_run(path: Path) -> Path:
    """Every way a run folder can be damaged, short of being deleted."""
    path.mkdir(parents=True)
    (path / "run.yaml").write_bytes(b"\x89\xff\xfe binary \x00\x01 junk")
    (path / "summary.json").write_text('{"steps": 30, "final_val_lo')  # truncated
    lines = [json.dumps(r) for r in train_metrics(30, 0.01)]
    lines[3] = "not json at all"
    lines[10] = '{"step": 11, "loss": '  # cut mid-record
    lines[20] = "[1, 2, 3]"  # JSON, but not a record
    lines.append("\x00\x01\x02")
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # report.md is missing
    (path / "eval").mkdir()
    (path / "eval" / "results.json").write_text("[1, 2, 3]")  # a list, not an object
    # eval/samples.jsonl is missing
    return path


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    make_full_run(root / "full")
    make_pretrain_run(root / "pre")
    make_broken_run(root / "broken")
    outside = tmp_path / "outside"
    make_pretrain_run(outside / "other")
    write_jsonl(outside / "secret.jsonl", [{"step": 1, SECRET: 1.0}])
    (outside / "secret.png").write_bytes(PNG + SECRET.encode())
    (root / "escape").symlink_to(outside, target_is_directory=True)
    linked = root / "linked"  # a run whose curves are a link to a file outside
    linked.mkdir()
    (linked / "run.yaml").write_text("train:\n  lr: 0.1\n")
    (linked / "metrics.jsonl").symlink_to(outside / "secret.jsonl")
    (root / "full" / "leak.png").symlink_to(outside / "secret.png")
    return root


@pytest.fixture
def served(runs_root, serve_app):
    with serve_app(create_runs_app(runs_root)) as (url, _):
        yield url


def get(
    url: str,
    path: str,
    params: dict | list | None = None,
    key: str | None = None,
    timeout: float = 60,
):
    """(status, parsed JSON or raw bytes) of a GET; `path` is sent exactly as written."""
    query = urllib.parse.urlencode(params or {}, doseq=True)
    request = urllib.request.Request(url + path + (f"?{query}" if query else ""))
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, body, kind = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(body) if kind.startswith("application/json") else body)


def stage(run: dict, name: str) -> dict:
    return next(s for s in run["stages"] if s["name"] == name)


def test_list_shows_runs_with_stages_and_headline_numbers(served):
    status, body = get(served, "/api/runs")
    assert status == 200
    runs = {r["path"]: r for r in body["runs"]}
    # Stages are not runs of their own; the symlink to outside is not followed.
    assert set(runs) == {"full", "pre", "broken", "linked"}
    full = runs["full"]
    assert full["kind"] == "run" and full["steps"] == 40
    assert [s["name"] for s in full["stages"]] == ["pretrain", "align", "eval", "sft", "data"]
    headline = dict(full["headline"])
    assert headline["val_loss"] == pytest.approx(5.2 - 3.0)  # the last val_loss logged
    assert headline["loss"] == pytest.approx(2.0)
    assert headline["reading acc"] == 0.5 and headline["cloze acc_norm"] == 0.25
    assert headline["sft exact_match"] == 0.5
    assert full["problems"] == []
    assert runs["pre"]["kind"] == "pretrain" and dict(runs["pre"]["headline"])["val_loss"]
    assert runs["broken"]["problems"]


def test_run_details_hold_eval_data_configs_and_report(served):
    status, run = get(served, "/api/run", {"path": "full"})
    assert status == 200
    assert all(f["state"] == "ok" for s in run["stages"] for f in s["files"])
    pre = stage(run, "pretrain")
    assert pre["metrics"] is True and pre["report"]["text"].startswith("# lmforge run")
    assert pre["configs"][0]["name"] == "run.yaml" and "lr: 0.01" in pre["configs"][0]["text"]
    assert dict(pre["summary"][0]["values"])["final_val_loss"] == 2.2
    ev = stage(run, "eval")
    assert ev["samples"] is True
    reading = next(t for t in ev["eval"] if t["task"] == "reading")
    assert reading["n"] == 12
    assert reading["metrics"] == [
        {"name": "acc", "value": 0.5, "stderr": 0.1},
        {"name": "acc_norm", "value": 0.25, "stderr": None},
    ]
    assert ev["configs"][0]["name"] == "results.json: config"  # eval has no YAML of its own
    data = stage(run, "data")
    assert data["path"] == "full/data/out"
    dedup = data["data"]["steps"][1]
    assert (dedup["step"], dedup["docs_in"], dedup["docs_out"]) == ("1:exact_dedup", 60, 52)
    assert dedup["reasons"] == {"duplicate": 8} and dedup["examples"][0]["text"] == "the same text"
    assert data["data"]["input"] == {"bad_records_skipped": 2}
    status, png = get(served, "/api/file", {"path": "full/loss.png"})
    assert status == 200 and png == PNG


def test_metrics_samples_and_compare(served):
    status, m = get(served, "/api/metrics", {"path": "full"})
    assert status == 200 and (m["lines"], m["bad_lines"], m["bucket_lines"]) == (40, 0, 1)
    assert m["keys"][:3] == ["loss", "lr", "grad_norm"] and "val_loss" in m["keys"]
    assert m["series"]["loss"]["x"] == list(range(1, 41))
    assert m["series"]["val_loss"]["x"] == [10, 20, 30, 40]
    _, only = get(served, "/api/metrics", {"path": "full/align", "keys": "reward_accuracy"})
    assert list(only["series"]) == ["reward_accuracy"] and "loss" in only["keys"]

    _, page = get(served, "/api/samples", {"path": "full/eval", "task": "cloze", "offset": 5})
    assert page["total"] == 7 and [i["index"] for i in page["items"]] == [5, 6]
    item = page["items"][0]
    assert item["prompt"] == "cloze question 5?\nAnswer:"
    assert (item["gold"], item["pred"], item["scores"]) == ("right 5", "wrong 5", {"acc": 0.0})
    _, sft = get(served, "/api/samples", {"path": "full/sft"})
    assert sft["items"][0]["pred"] == " 4" and sft["items"][0]["scores"] == {"correct": True}

    status, cmp = get(served, "/api/compare", [("path", "full"), ("path", "pre")])
    assert status == 200 and [r["path"] for r in cmp["runs"]] == ["full", "pre"]
    assert dict(cmp["diff"])["train.lr"] == [0.01, 0.003]
    assert get(served, "/api/compare", {"path": "full"})[0] == 400
    status, body = get(served, "/api/metrics", {"path": "full", "points": "many"})
    assert status == 400 and body["error"].startswith("points:")


@pytest.mark.parametrize(
    "endpoint",
    ["/api/run?path={}", "/api/metrics?path={}", "/api/samples?path={}", "/api/file?path={}/x.png"],
)
def test_paths_outside_the_root_are_refused(served, endpoint):
    for path in (
        "..",
        "../outside",
        "full/../../outside/other",
        "%2e%2e/outside",  # decoded by the server to ../outside
        "%2E%2E%2Foutside%2Fother",
        "/etc",
        "%2Fetc",
        "escape",  # a symlink inside the root that points outside
        "escape/other",
        "full\\..\\..\\outside",
    ):
        status, body = get(served, endpoint.format(path))
        assert status == 403, (endpoint, path, body)
        assert "runs directory" in body["error"] or "'..'" in body["error"]
    status, body = get(served, endpoint.format("nope"))
    assert status == 404 and "nope" in body["error"]


def test_files_linking_outside_are_not_read(served):
    _, run = get(served, "/api/run", {"path": "linked"})
    metrics = next(f for f in stage(run, "pretrain")["files"] if f["name"] == "metrics.jsonl")
    assert metrics["state"] == "refused" and "outside" in run["error"]
    assert get(served, "/api/metrics", {"path": "linked"})[0] == 403
    assert get(served, "/api/file", {"path": "full/leak.png"})[0] == 403
    assert get(served, "/api/file", {"path": "full/run.yaml"})[0] == 415  # images only
    for path in ("/api/runs", "/api/run?path=linked", "/api/compare?path=linked&path=full"):
        status, body = get(served, path)
        assert status == 200 and SECRET not in json.dumps(body)


def test_missing_and_corrupt_files_are_reported_not_fatal(served):
    status, run = get(served, "/api/run", {"path": "broken"})
    assert status == 200
    files = {(s["name"], f["name"]): f for s in run["stages"] for f in s["files"]}
    assert files["pretrain", "run.yaml"]["state"] == "unreadable"
    assert "UTF-8" in files["pretrain", "run.yaml"]["note"]
    assert files["pretrain", "summary.json"]["state"] == "unreadable"
    assert "not valid JSON" in files["pretrain", "summary.json"]["note"]
    assert files["pretrain", "report.md"]["state"] == "missing"
    assert files["eval", "results.json"]["note"] == "expected a JSON object, found list"
    assert files["eval", "samples.jsonl"]["state"] == "missing"
    # The registry could not read them either: its problems are the run's error.
    assert "run.yaml: not UTF-8 text (binary data at byte 0)" in run["error"]
    assert "summary.json: not valid JSON" in run["error"]
    assert "metrics.jsonl: 4 line(s) are not JSON objects (first: line 4)" in run["error"]
    status, m = get(served, "/api/metrics", {"path": "broken"})
    assert status == 200 and (m["lines"], m["records"], m["bad_lines"]) == (31, 27, 4)
    assert len(m["series"]["loss"]["x"]) == 27
    assert get(served, "/api/samples", {"path": "broken/eval"})[0] == 404


def test_nan_and_odd_values_stay_valid_json(tmp_path, serve_app):
    run = tmp_path / "odd"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": NaN, "note": "warmup", "flag": true}\n'
        '{"step": 2, "loss": Infinity, "lr": 1e999}\n'
        '{"step": 3, "loss": 2.5, "big": 1' + "0" * 400 + "}\n"
        '{"loss": 2.0}\n'
    )
    long = tmp_path / "long"  # 20 MB of junk without a newline between two records
    long.mkdir()
    (long / "metrics.jsonl").write_bytes(b'{"loss": 1}\n' + b"x" * (20 << 20) + b'\n{"loss": 2}')
    write_json(run / "summary.json", {"when": "2024-01-01"})
    (run / "run.yaml").write_text("started: 2024-01-01\nlr: .nan\n")
    with serve_app(create_runs_app(tmp_path)) as (url, _):
        status, m = get(url, "/api/metrics", {"path": "odd"})
        assert status == 200
        loss = m["series"]["loss"]
        assert (loss["x"], loss["y"], loss["nonfinite"]) == ([3, 4], [2.5, 2.0], 2)
        assert "note" not in m["keys"] and "flag" not in m["keys"]  # not numbers
        assert m["series"]["big"]["nonfinite"] == 1
        _, m = get(url, "/api/metrics", {"path": "long"})
        assert (m["lines"], m["bad_lines"], m["series"]["loss"]["y"]) == (3, 1, [1, 2])
        assert get(url, "/api/run", {"path": "odd"})[0] == 200
        assert get(url, "/api/runs")[0] == 200


def test_huge_metrics_file_is_downsampled_keeping_extremes(tmp_path, serve_app):
    run = tmp_path / "huge"
    run.mkdir()
    n = 1_000_000
    rng = np.random.default_rng(0)
    loss = 4.0 + np.cumsum(rng.normal(0, 0.001, n))
    loss[777_777] = 1e3  # a one-step spike
    loss[123_457] = -5.0  # and a dip: both must survive any reduction
    steps = np.arange(1, n + 1)
    with open(run / "metrics.jsonl", "w") as f:
        np.savetxt(
            f,
            np.column_stack([steps, loss, steps * 1e-7, steps * 512]),
            fmt='{"step": %d, "loss": %.6f, "lr": %.4g, "tokens": %d}',
        )
    with serve_app(create_runs_app(tmp_path)) as (url, _):
        start = time.perf_counter()
        status, m = get(url, "/api/metrics", {"path": "huge", "points": 1000})
        seconds = time.perf_counter() - start
        print(f"\n1,000,000-line metrics.jsonl downsampled in {seconds:.2f} s")
    assert status == 200 and m["lines"] == n and m["bad_lines"] == 0
    for key in ("loss", "lr", "tokens"):
        assert 900 <= len(m["series"][key]["x"]) <= 1000
    series = m["series"]["loss"]
    assert max(series["y"]) == 1e3 and series["x"][series["y"].index(1e3)] == 777_778
    assert min(series["y"]) == -5.0 and series["x"][series["y"].index(-5.0)] == 123_458
    assert series["x"] == sorted(series["x"]) and series["x"][0] == 1 and series["x"][-1] == n
    assert len(json.dumps(m)) < 100_000
    assert seconds < 15  # about 1.5 s on two shared cores


def test_api_key_guards_the_api_not_the_page(runs_root, serve_app):
    with serve_app(create_runs_app(runs_root, api_key="sk-runs")) as (url, _):
        for key in (None, "wrong", ""):
            status, body = get(url, "/api/runs", key=key)
            assert status == 401 and "API key" in body["error"]
        assert get(url, "/api/run?path=..", key="wrong")[0] == 401  # before anything else
        assert get(url, "/api/runs", key="sk-runs")[0] == 200
        status, page = get(url, "/")
        assert status == 200 and b'src="static/runs.js"' in page
        assert get(url, "/static/plot.js")[0] == 200


def tree(root: Path) -> dict:
    """Every entry under root (links not followed): type, size, mtime, and a file's bytes."""
    out = {}
    for directory, subdirs, files in os.walk(root):
        for name in [".", *subdirs, *files]:
            path = Path(directory) / name
            st = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


def test_nothing_is_written_into_the_runs(runs_root, tmp_path, serve_app):
    before, outside = tree(runs_root), tree(tmp_path / "outside")
    with serve_app(create_runs_app(runs_root)) as (url, _):
        _, listing = get(url, "/api/runs")
        for run in listing["runs"]:
            _, details = get(url, "/api/run", {"path": run["path"]})
            for s in details["stages"]:
                get(url, "/api/metrics", {"path": s["path"]})
                get(url, "/api/metrics", {"path": s["path"], "points": 10, "keys": "loss"})
                get(url, "/api/samples", {"path": s["path"], "task": "reading", "limit": 3})
        get(url, "/api/compare", [("path", "full"), ("path", "pre"), ("path", "broken")])
        get(url, "/api/file", {"path": "full/loss.png"})
        get(url, "/api/run", {"path": "../outside"})
        get(url, "/")
    assert tree(runs_root) == before and tree(tmp_path / "outside") == outside


def test_ui_command_refuses_open_host_without_key_and_missing_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    assert main(["ui", str(tmp_path), "--host=0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err
    assert main(["ui", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'} is not a directory" in err


def test_page_is_light_and_needs_no_other_site(served):
    status, html = get(served, "/")
    assert status == 200
    refs = re.findall(r'(?:src|href)="([^"]+)"', html.decode())
    assert all(r.startswith(("static/", "#", "data:")) for r in refs), refs  # no CDN
    assets = [r for r in refs if r.startswith("static/")]
    assert {"static/runs.js", "static/plot.js", "static/markdown.js"} <= set(assets)
    total = len(html)
    for asset in assets:
        status, body = get(served, "/" + asset)
        assert status == 200
        total += len(body)
    assert total < 100_000  # the budget is 300 KB for the first load


# Run folders that are damaged in ways that once hung the server or made it fail (500): each is
# answered at once, with the damage shown as such.


def test_fifos_are_unreadable_files_not_hangs(tmp_path, serve_app, fifos):
    run = make_pretrain_run(tmp_path / "r")
    (run / "run.yaml").unlink()
    stage = make_pretrain_run(tmp_path / "q")
    (stage / "metrics.jsonl").unlink()
    named = [run / n for n in ("run.yaml", "results.json", "tags.json", "report.md", "loss.png")]
    with fifos(*named, stage / "metrics.jsonl"), serve_app(create_runs_app(tmp_path)) as (url, _):
        status, body = get(url, "/api/runs", timeout=20)
        assert status == 200
        runs = {r["path"]: r for r in body["runs"]}
        assert runs["r"]["error"] == (
            "run.yaml: cannot be read (not a regular file); "
            "results.json: cannot be read (not a regular file); "
            "tags.json: cannot be read (not a regular file)"
        )
        assert runs["r"]["steps"] == 25 and runs["q"]["kind"] == "pretrain"
        status, details = get(url, "/api/run", {"path": "r"}, timeout=20)
        files = {f["name"]: f for f in stage_of(details, "pretrain")["files"]}
        assert status == 200 and files["metrics.jsonl"]["state"] == "ok"
        for name in ("run.yaml", "report.md"):
            assert (files[name]["state"], files[name]["note"]) == (
                "unreadable",
                "not a regular file",
            )
        assert get(url, "/api/metrics", {"path": "q"}, timeout=20)[0] == 404
        assert get(url, "/api/file", {"path": "r/loss.png"}, timeout=20)[0] == 404


def stage_of(run: dict, name: str) -> dict:
    return next(s for s in run["stages"] if s["name"] == name)


def alias_bomb(levels: int) -> str:
    """YAML whose level n maps ten keys to aliases of level n - 1: 10**levels values once
    walked, in a few hundred bytes."""
    lines = ["l0: &l0 {k: 1}"]
    for n in range(1, levels + 1):
        aliases = ", ".join(f"k{i}: *l{n - 1}" for i in range(10))
        lines.append(f"l{n}: &l{n} {{{aliases}}}")
    return "\n".join(lines) + "\n"


def test_yaml_bombs_and_deep_nesting_are_unreadable_configs(tmp_path, serve_app):
    (make_pretrain_run(tmp_path / "bomb") / "run.yaml").write_text(alias_bomb(6))
    (make_pretrain_run(tmp_path / "deep") / "run.yaml").write_text("[" * 3000 + "]" * 3000)
    with serve_app(create_runs_app(tmp_path)) as (url, _):
        start = time.perf_counter()
        status, body = get(url, "/api/runs")
        assert status == 200 and time.perf_counter() - start < 10
        runs = {r["path"]: r for r in body["runs"]}
        assert runs["bomb"]["error"] == "run.yaml: YAML aliases are not supported (line 2)"
        assert runs["deep"]["error"] == "run.yaml: not valid YAML (nested too deeply)"
        status, run = get(url, "/api/run", {"path": "deep"})
        config = stage_of(run, "pretrain")["files"][0]
        assert status == 200 and config["name"] == "run.yaml"
        assert (config["state"], config["note"]) == (
            "unreadable",
            "not valid YAML (nested too deeply)",
        )
        assert get(url, "/api/compare", [("path", "bomb"), ("path", "deep")])[0] == 200


def test_damaged_sample_lines_are_shown_not_fatal(tmp_path, serve_app):
    nested = "[" * 900 + "]" * 900  # parses, but deeper than Python recurses
    lines = [
        '{"task": "t", "index": NaN, "prompt": "p0"}',
        '{"task": "t", "choices": ["a", "b"], "gold": NaN, "pred": Infinity}',
        '{"task": "t", "choices": ["a", "b"], "gold": [1.0, 1], "pred": -Infinity}',
        f'{{"task": "t", "prompt": {nested}, "scores": {{"deep": {nested}}}}}',
        f'{{"task": "t", "gold": {{"a": {nested}}}, "output": {nested}}}',
        "not json",
    ]
    run = tmp_path / "ev"
    run.mkdir()
    write_json(run / "results.json", {"results": {"t": {"acc": 0.5}}})
    (run / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with serve_app(create_runs_app(tmp_path)) as (url, _):
        status, page = get(url, "/api/samples", {"path": "ev", "task": "t"})
    assert status == 200 and (page["total"], page["bad_lines"]) == (5, 1)
    first, second, third, fourth, fifth = page["items"]
    assert first["index"] is None and first["record"]["index"] == "nan"
    assert (second["gold"], second["pred"]) == ("nan", "inf")
    assert (third["gold"], third["pred"]) == ("1.0 | b", "-inf")  # only an int is an index
    assert fourth["prompt"] == "[...]" and fourth["scores"]["deep"][0][0][0]
    assert "[...]" in json.dumps(fourth["record"]) and fifth["pred"] == "[...]"


def test_overlong_paths_are_refused_clearly(served):
    for endpoint, path in (
        ("/api/run", "a" * 300),
        ("/api/metrics", "a" * 300),
        ("/api/samples", "full/" + "a" * 300),
        ("/api/file", "d/" * 3000 + "x.png"),
    ):
        status, body = get(served, endpoint, {"path": path})
        assert status == 400, (endpoint, body)
        assert body["error"].endswith(": File name too long")


def test_errors_never_say_where_the_runs_are(runs_root, tmp_path, serve_app, monkeypatch):
    def fails(path):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(Path(path) / "loop.png"))

    monkeypatch.setattr("lmforge.experiments.registry.read_run", fails)
    (runs_root / "full" / "loop.png").symlink_to("loop.png")
    with serve_app(create_runs_app(runs_root)) as (url, _):
        status, body = get(url, "/api/runs")
        assert status == 200
        assert {r["error"] for r in body["runs"] if r["path"] != "linked"} == {
            "unreadable (Too many levels of symbolic links)"
        }
        answers = [body, *everything(url, body)]
    assert str(tmp_path) not in json.dumps(answers)


def everything(url: str, listing: dict) -> list:
    """The answers of every endpoint for every run and stage of `listing`, and of some paths
    that fail."""
    answers = []
    for run in listing["runs"]:
        status, details = get(url, "/api/run", {"path": run["path"]})
        answers.append(details)
        for stage in details.get("stages", []):
            answers.append(get(url, "/api/metrics", {"path": stage["path"]})[1])
            answers.append(get(url, "/api/samples", {"path": stage["path"]})[1])
            answers.append(get(url, "/api/file", {"path": f"{stage['path']}/loss.png"})[1])
    paths = [("path", r["path"]) for r in listing["runs"]]
    answers.append(get(url, "/api/compare", paths)[1])
    for path in ("full/loop.png", "full/loss.png", "full/leak.png", "a" * 300, "x/" * 3000):
        answers.append(get(url, "/api/file", {"path": path})[1])
        answers.append(get(url, "/api/run", {"path": path})[1])
    return [a if isinstance(a, dict) else a.decode("latin-1") for a in answers]


@contextlib.contextmanager
def unprivileged_server(root: Path):
    """`lmforge ui root`'s app served by a process for which file permissions hold: as root
    (who may read anything) it runs without capabilities, under setpriv."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys, uvicorn\n"
        "from lmforge.web.runs import create_runs_app\n"
        "app = create_runs_app(sys.argv[1])\n"
        "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')\n"
    )
    command = [sys.executable, "-c", code, str(root), str(port)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *command]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_folders_and_files_that_cannot_be_read(runs_root, tmp_path):
    make_pretrain_run(runs_root / "sealed").chmod(0o000)  # not even listed
    (runs_root / "pre").chmod(0o644)  # listed, not entered: no file in it can be opened
    (runs_root / "full" / "loss.png").chmod(0o000)
    try:
        with unprivileged_server(runs_root) as url:
            status, listing = get(url, "/api/runs")
            answers = [listing, *everything(url, listing)]
            run = get(url, "/api/run", {"path": "pre"})[1]
            responses = [
                get(url, "/api/run", {"path": "sealed"}),
                get(url, "/api/metrics", {"path": "pre"}),
                get(url, "/api/file", {"path": "full/loss.png"}),
            ]
    finally:
        (runs_root / "sealed").chmod(0o755)
        (runs_root / "pre").chmod(0o755)
    assert status == 200
    pre = next(r for r in listing["runs"] if r["path"] == "pre")
    assert pre["kind"] == "pretrain" and pre["error"] == (
        "run.yaml: cannot be read (Permission denied); "
        "metrics.jsonl: cannot be read (Permission denied)"
    )
    states = {(f["name"], f["state"], f["note"]) for f in stage_of(run, "pretrain")["files"]}
    assert states == {
        ("run.yaml", "unreadable", "Permission denied"),
        ("metrics.jsonl", "unreadable", "Permission denied"),
    }
    assert [(status, body["error"]) for status, body in responses] == [
        (422, "cannot read directory 'sealed': Permission denied"),
        (422, "cannot open metrics.jsonl in 'pre': Permission denied"),
        (422, "cannot read loss.png in 'full': Permission denied"),
    ]
    assert str(tmp_path) not in json.dumps(answers)
