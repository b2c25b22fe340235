"""lmforge's MinHash dedup and Gopher filters vs datatrove's, on the same offline documents.

Documents: ~1,000-character chunks of lmforge's default corpus and of the standard library's
Python sources, plus injected exact copies and near-copies (k random words replaced, so each
pair's 5-gram Jaccard is known by brute force). datatrove runs in its own virtualenv
(DATATROVE_PYTHON, default /work/datatrove-venv/bin/python) on the same JSONL file, through its
own executor: signature -> buckets -> cluster stages, and the Gopher filters. Both wall and CPU
time (time.process_time of the one process that does the work) are reported: on a shared machine
the CPU-time ratio is the steadier one.

    nice -n 19 .venv/bin/python benchmarks/data_vs_datatrove.py --docs 50000
    # peak RSS of the lmforge side alone as the input grows 10x (one process each):
    nice -n 19 .venv/bin/python benchmarks/data_vs_datatrove.py --docs 5000 --gopher-docs 5000 \
        --lmforge-only
    # peak RSS of `lmforge data process` (minhash_dedup) over the same documents in 10 shards:
    nice -n 19 .venv/bin/python benchmarks/data_vs_datatrove.py --docs 5000 --pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

DATATROVE = r"""
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupSignature)
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
src, work, what = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
if what == "minhash":
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    t, c = time.perf_counter(), time.process_time()
    for stage, tasks in (  # the bucket stage needs one task per bucket; still one worker
        ([JsonlReader(src), MinhashDedupSignature(output_folder=f"{work}/sig", config=cfg)], 1),
        ([MinhashDedupBuckets(input_folder=f"{work}/sig", output_folder=f"{work}/buckets", config=cfg)], 14),
        ([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/ids", config=cfg)], 1),
    ):
        LocalPipelineExecutor(pipeline=stage, tasks=tasks, workers=1, logging_dir=f"{work}/logs{time.time()}",
                              skip_completed=False).run()
    out["minhash_s"], out["minhash_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    import os, struct
    rm = f"{work}/ids/000000.remove"
    data = open(rm, "rb").read() if os.path.exists(rm) else b""
    out["removed"] = [v for (v,) in struct.iter_unpack("<I", data)]
else:
    docs = [Document(text=json.loads(l)["text"], id=str(i)) for i, l in enumerate(open(src))]
    q, r = GopherQualityFilter(), GopherRepetitionFilter()
    t, c = time.perf_counter(), time.process_time()
    kept = []
    for d in docs:
        ok = q.filter(d)
        ok = ok if ok is not True and ok is not False and not isinstance(ok, bool) else ok
        keep = (ok is True) or (isinstance(ok, tuple) and ok[0])
        if keep:
            ok2 = r.filter(d)
            keep = (ok2 is True) or (isinstance(ok2, tuple) and ok2[0])
        kept.append(keep)
    out["gopher_s"], out["gopher_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    out["kept"] = kept
status = open("/proc/self/status").read().splitlines()  # VmHWM: see PIPELINE below
out["peak_rss_mb"] = int(next(l for l in status if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps(out))
"""

# The streaming pipeline in a fresh process (so the benchmark's in-memory documents do not count).
# Peaks of child processes from /proc's VmHWM: getrusage's ru_maxrss survives exec on Linux, so
# a child started from this (large) process would report at least this process's size.
PIPELINE = r"""
import json, sys, time
from pathlib import Path
def hwm():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
from lmforge.data.pipeline import PipelineConfig, process
base = hwm()
t, c = time.perf_counter(), time.process_time()
config = PipelineConfig(input=[sys.argv[1]], output=sys.argv[2], steps=["minhash_dedup"],
                        rejects=False, overwrite=True)
stats = process(config)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                  "documents_out": stats["output_documents"], "decision": stats["decisions"],
                  "rss_after_imports_mb": base,
                  "peak_rss_mb": hwm()}))
"""


def pipeline_rss(docs: list[str], shards: int = 10) -> dict:
    """Peak RSS of `lmforge data process` with `minhash_dedup` over the documents in JSONL shards."""
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "in"
        root.mkdir()
        per = -(-len(docs) // shards)
        for s in range(shards):
            with (root / f"part{s:02d}.jsonl").open("w") as f:
                for i, text in enumerate(docs[s * per : (s + 1) * per]):
                    f.write(json.dumps({"text": text, "id": f"{s}-{i}"}) + "\n")
        proc = subprocess.run([sys.executable, "-c", PIPELINE, str(root), f"{work}/out"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chunks(text: str, size: int = 1000) -> list[str]:
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur.strip() else [])


def build_documents(n: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Real text chunks, plus injected exact and near copies with their brute-force Jaccard."""
    from lmforge.data.default_corpus import default_documents

    base: list[str] = []
    for d in default_documents():
        base += chunks(d["text"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if len(base) >= n:
            break
        try:
            base += chunks(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    rng = random.Random(seed)
    n_inject = n // 20
    docs = base[: n - n_inject]
    pairs = []
    for _ in range(n_inject):
        i = rng.randrange(len(docs))
        words = docs[i].split(" ")
        if len(words) < 60:
            continue
        k = rng.choice([0, 1, 2, 4, 8, 20, 40])
        for j in rng.sample(range(len(words)), min(k, len(words))):
            words[j] = f"injected{rng.randrange(10**9)}"
        docs.append(" ".join(words))
        pairs.append((i, len(docs) - 1, jaccard(docs[i], docs[-1])))
    return docs, pairs


def jaccard(a: str, b: str, n: int = 5) -> float:
    from lmforge.data.minhash import tokens

    def grams(t: str) -> set:
        w = tokens(t)
        return {tuple(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}

    x, y = grams(a), grams(b)
    return len(x & y) / max(1, len(x | y))


def injected_precision(pairs: list[tuple[int, int, float]], dropped: set[int]) -> dict:
    """Injected copies dropped, and the share of them that are true near-copies."""
    js = [j for _, b, j in pairs if b in dropped]
    hi = [j for _, _, j in pairs if j >= 0.85]
    return {
        "dropped": len(js),
        "precision_j>=0.85": float(np.mean([j >= 0.85 for j in js])) if js else 1.0,
        "precision_j>=0.7": float(np.mean([j >= 0.7 for j in js])) if js else 1.0,
        "recall_j>=0.85": sum(j >= 0.85 for j in js) / max(1, len(hi)),
    }


def lmforge_minhash(docs: list[str], threshold: float | None) -> tuple[tuple, np.ndarray, dict]:
    """Signatures, buckets and clusters; with `threshold`, candidate pairs are verified by exact
    Jaccard (the candidates' shingles recomputed from the text, as the pipeline does)."""
    from lmforge.data.minhash import MinHasher, ShingleHasher, duplicate_clusters

    t, c = time.perf_counter(), time.process_time()
    hasher, mh = ShingleHasher(5), MinHasher(14, 8)
    keys = []
    for start in range(0, len(docs), 1024):  # streamed in batches, as the pipeline does
        batch = [hasher(d) for d in docs[start : start + 1024]]
        keys.append(mh.band_keys(mh.signatures(batch)))

    def shingles(ids: np.ndarray):
        return ((i, hasher(docs[i])) for i in ids.tolist())

    uf, summary = duplicate_clusters(
        list(np.concatenate(keys).T),
        shingles=None if threshold is None else shingles,
        threshold=threshold or 0.0,
    )
    return (time.perf_counter() - t, time.process_time() - c), uf.roots(), summary


def lmforge_gopher(docs: list[str]) -> tuple[tuple, list[bool]]:
    from lmforge.data.filters import GopherQuality, GopherRepetition

    q, r = GopherQuality(), GopherRepetition()
    t, c = time.perf_counter(), time.process_time()
    kept = []
    for text in docs:
        d = {"text": text, "meta": {}}
        kept.append(q(d) is None and r(d) is None)
    return (time.perf_counter() - t, time.process_time() - c), kept


def main() -> None:
    from lmforge.data.filters import GopherQuality, GopherRepetition

    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--gopher-docs", type=int, default=10_000)
    parser.add_argument(
        "--peer", default=os.environ.get("DATATROVE_PYTHON", "/work/datatrove-venv/bin/python")
    )
    parser.add_argument(
        "--threshold", type=float, default=0.85, help="exact-Jaccard check of candidate pairs"
    )
    parser.add_argument(
        "--lmforge-only", action="store_true", help="skip datatrove (peak-RSS runs: 5k vs 50k)"
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="only the peak RSS of the streaming pipeline"
    )
    args = parser.parse_args()
    docs, pairs = build_documents(args.docs)
    print(
        f"{len(docs):,} documents, {sum(map(len, docs)):,} characters; {len(pairs)} injected copies"
    )
    if args.pipeline:
        print(json.dumps({"documents": len(docs), "pipeline": pipeline_rss(docs)}, indent=2))
        return
    results: dict = {"documents": len(docs)}
    # Peak so far: the documents (held in memory here, streamed in the pipeline) and their build.
    results["rss_after_documents_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    hi = [(a, b) for a, b, j in pairs if j >= 0.85]
    for label, threshold in (("lmforge_minhash", args.threshold), ("lmforge_unverified", None)):
        (seconds, cpu), roots, summary = lmforge_minhash(docs, threshold)
        recall = np.mean([roots[a] == roots[b] for a, b in hi])
        dropped = np.flatnonzero(roots != np.arange(len(docs)))
        # Precision over all drops: a dropped document must really be a near-copy (5-gram
        # Jaccard >= 0.7 with the document its cluster keeps; brute force on a sample of 500).
        sample = np.random.default_rng(0).choice(dropped, min(500, len(dropped)), replace=False)
        precision = np.mean([jaccard(docs[i], docs[roots[i]]) >= 0.7 for i in sample])
        # Precision on the injected set (the measure): of the injected copies dropped,
        # the share whose true 5-gram Jaccard with their original is >= 0.85 (and >= 0.7).
        results[f"{label}_injected"] = injected_precision(pairs, set(dropped.tolist()))
        print(label, "injected copies dropped", results[f"{label}_injected"])
        results[label] = {
            "seconds": seconds, "cpu_s": cpu, "docs_per_s": len(docs) / seconds,
            "dropped": len(dropped),
            "recall_j>=0.85": float(recall), "pairs_j>=0.85": len(hi),
            "precision_all_drops_j>=0.7": float(precision), **summary,
        }  # fmt: skip
        print(label, results[label])
    results["rss_after_minhash_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sub = docs[: args.gopher_docs]
    (seconds, cpu), kept = lmforge_gopher(sub)
    results["lmforge_gopher"] = {
        "seconds": seconds,
        "cpu_s": cpu,
        "docs_per_s": len(sub) / seconds,
        "kept": sum(kept),
    }
    print("lmforge gopher", results["lmforge_gopher"])
    results["lmforge_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"lmforge peak RSS {results['lmforge_peak_rss_mb']:.0f} MB "
          f"({results['rss_after_documents_mb']:.0f} MB after building the documents, "
          f"{results['rss_after_minhash_mb']:.0f} MB after MinHash)")  # fmt: skip

    if args.lmforge_only:
        pass
    elif not Path(args.peer).exists():
        print(f"datatrove not run: {args.peer} does not exist")
    else:
        with tempfile.TemporaryDirectory() as work:
            for name, texts in (("minhash", docs), ("gopher", sub)):
                src = Path(work) / f"{name}.jsonl"
                with src.open("w") as f:
                    for i, text in enumerate(texts):
                        f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
                proc = subprocess.run([args.peer, "-c", DATATROVE, str(src), work, name],
                                      capture_output=True, text=True)  # fmt: skip
                if proc.returncode:
                    print(proc.stderr[-3000:])
                    continue
                peer = json.loads(proc.stdout.strip().splitlines()[-1])
                if name == "minhash":
                    s, cpu = peer["minhash_s"], peer["minhash_cpu_s"]
                    ours = results["lmforge_minhash"]
                    results["datatrove_minhash"] = {
                        "seconds": s, "cpu_s": cpu, "docs_per_s": len(docs) / s,
                        "peak_rss_mb": peer["peak_rss_mb"],
                        "ratio_wall": s / ours["seconds"], "ratio_cpu": cpu / ours["cpu_s"],
                    }  # fmt: skip
                    results["datatrove_injected"] = injected_precision(pairs, set(peer["removed"]))
                    print("datatrove injected copies dropped", results["datatrove_injected"])
                    print(f"datatrove minhash {s:.1f}s ({cpu:.1f}s CPU); lmforge is "
                          f"{s / ours['seconds']:.2f}x in wall time, "
                          f"{cpu / ours['cpu_s']:.2f}x in CPU time")  # fmt: skip
                else:
                    s, cpu = peer["gopher_s"], peer["gopher_cpu_s"]
                    ours = results["lmforge_gopher"]
                    agree = sum(a == b for a, b in zip(kept, peer["kept"]))
                    results["datatrove_gopher"] = {
                        "seconds": s, "cpu_s": cpu, "docs_per_s": len(sub) / s,
                        "kept": sum(peer["kept"]), "agree": agree,
                        "ratio_wall": s / ours["seconds"], "ratio_cpu": cpu / ours["cpu_s"],
                    }  # fmt: skip
                    results["gopher_disagreements"] = [
                        (i, GopherQuality()(d := {"text": sub[i], "meta": {}}) or GopherRepetition()(d))
                        for i, (a, b) in enumerate(zip(kept, peer["kept"])) if a != b
                    ]  # fmt: skip
                    print(f"datatrove gopher {s:.1f}s ({cpu:.1f}s CPU); lmforge is "
                          f"{s / ours['seconds']:.2f}x in wall time, "
                          f"{cpu / ours['cpu_s']:.2f}x in CPU time; "
                          f"same decision on {agree}/{len(sub)}")  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
