import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.scaling.sweep import SweepConfig, collect_runs, run_sweep
from lmforge.train.trainer import Trainer

SUMMARY_KEYS = {
    "name",
    "n_params",
    "n_params_non_embedding",
    "tokens",
    "flops",
    "final_val_loss",
    "tokenizer_sha256",
    "status",
}


def tiny_config(tmp_path) -> SweepConfig:
    rng = np.random.default_rng(0)
    words = ["the", "model", "reads", "a", "list", "of", "tokens", "and", "returns", "value"]
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(200):
            text = " ".join(rng.choice(words, size=60))
            f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
    return from_dict(
        SweepConfig,
        {
            "data": [str(corpus)],
            "out": str(tmp_path / "sweep"),
            "vocab_size": 300,
            "val_fraction": 0.1,
            "seq_len": 32,
            "batch_size": 8,
            "sizes": [
                {"d_model": 32, "n_layers": 1, "n_heads": 2},
                {"d_model": 48, "n_layers": 1, "n_heads": 2},
            ],
            "token_budgets": [2048, 4096],
            "eval_batches": 2,
            "save_every": 0,
        },
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from more threads, and on a shared machine they spin-wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("sweep"))
    return config, run_sweep(config)


def test_sweep_writes_one_summary_per_run(sweep):
    config, summaries = sweep
    files = sorted((Path(config.out) / "runs").glob("*/summary.json"))
    assert len(summaries) == len(files) == 4
    by_name = {s["name"]: s for s in summaries}
    assert set(by_name) == {f.parent.name for f in files}
    for s in summaries:
        assert set(s) >= SUMMARY_KEYS
        assert s["status"] == "ok" and np.isfinite(s["final_val_loss"])
        assert s["tokens"] == s["token_budget"] == s["steps"] * 8 * 32
        assert s["flops"] == pytest.approx(s["tokens"] * s["flops_per_token"])
        assert s["flops_per_token"] > 6 * s["n_params_non_embedding"]
    # One tokenizer for the whole sweep, built once.
    assert len({s["tokenizer_sha256"] for s in summaries}) == 1
    assert (Path(config.out) / "data" / "shards" / "index.json").is_file()


def test_rerun_skips_finished_runs(sweep):
    config, summaries = sweep
    metrics = sorted((Path(config.out) / "runs").glob("*/metrics.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in metrics}
    start = time.perf_counter()
    again = run_sweep(config)
    assert time.perf_counter() - start < 5
    assert again == summaries
    assert {p: p.stat().st_mtime_ns for p in metrics} == before


def test_interrupted_run_resumes_from_its_checkpoint(sweep):
    config, summaries = sweep
    run_dir = Path(config.out) / "runs" / summaries[-1]["name"]
    (run_dir / "summary.json").unlink()
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    again = run_sweep(config)
    # The run's last checkpoint is its final step: resuming trains nothing more.
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == metrics
    assert again[-1]["final_val_loss"] == pytest.approx(summaries[-1]["final_val_loss"])


def test_run_interrupted_before_its_first_checkpoint_starts_over(sweep):
    config, summaries = sweep
    run_dir = Path(config.out) / "runs" / summaries[0]["name"]
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    again = run_sweep(config)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, summaries[0]["steps"] + 1))
    assert again[0]["final_val_loss"] == pytest.approx(summaries[0]["final_val_loss"], rel=1e-4)


def test_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    config.sizes, config.token_budgets = config.sizes[:1], [512, 1024]

    def fit(self):
        if self.config.steps == 2:
            raise FloatingPointError("loss became nan at step 1")
        return {"final_val_loss": 5.0, "tokens_seen": 1024, "train_seconds": 0.1}

    monkeypatch.setattr(Trainer, "fit", fit)
    diverged, ok = run_sweep(config)
    assert diverged["status"] == "diverged" and diverged["final_val_loss"] is None
    assert "nan" in diverged["error"] and ok["status"] == "ok"
    summary_file = Path(config.out) / "runs" / diverged["name"] / "summary.json"
    assert json.loads(summary_file.read_text()) == diverged


def test_collect_runs_excludes_diverged_and_foreign_tokenizer(sweep, tmp_path):
    config, summaries = sweep
    extra = tmp_path / "extra"
    for name, changes in {
        "diverged": {"status": "diverged", "error": "loss became nan at step 3"},
        "other-tok": {"tokenizer_sha256": "f" * 64},
    }.items():
        (extra / name).mkdir(parents=True)
        summary = {**summaries[0], "name": name, **changes}
        (extra / name / "summary.json").write_text(json.dumps(summary))
    runs = collect_runs([config.out, extra / "diverged", extra / "other-tok"])
    assert len(runs) == 6
    excluded = {r["name"]: r["excluded"] for r in runs if r["excluded"]}
    assert set(excluded) == {"diverged", "other-tok"}
    assert "diverged" in excluded["diverged"] and "nan" in excluded["diverged"]
    assert "tokenizer" in excluded["other-tok"]


def test_bad_sweep_config_names_the_field():
    with pytest.raises(ConfigError, match="sizes\\[0\\].d_modle"):
        from_dict(SweepConfig, {"sizes": [{"d_modle": 64}]})
    with pytest.raises(ConfigError, match="below one step"):
        from_dict(SweepConfig, {"token_budgets": [100]})


def synthetic_runs(law) -> list[dict]:
    """Runs whose losses follow `law` exactly, the last one larger and held out."""
    grid = [(n, d) for n in (1e5, 3e5, 1e6) for d in (1e5, 3e5, 1e6, 3e6)] + [(3e6, 1e7)]
    return [
        {
            "name": f"run{i}",
            "path": f"runs/run{i}",
            "n_params": int(2 * n),
            "n_params_non_embedding": int(n),
            "tokens": int(d),
            "flops": 6 * 2 * n * d,
            "final_val_loss": float(law.loss(int(n), int(d))),
            "status": "ok",
            "holdout": i == 12,
            "excluded": None,
        }
        for i, (n, d) in enumerate(grid)
    ]


def test_report_of_a_fit_to_synthetic_runs(tmp_path):
    from lmforge.scaling.fit import ChinchillaFit
    from lmforge.scaling.laws import ChinchillaLaw
    from lmforge.scaling.report import write_scaling_report

    truth = ChinchillaLaw(E=2.0, A=50.0, B=80.0, alpha=0.4, beta=0.35)
    runs = synthetic_runs(truth)
    runs.append({**runs[0], "name": "bad", "status": "diverged", "excluded": "status diverged"})
    # A synthetic fit (the true law): fitting itself is tested with the fit module.
    intervals = {"E": (1.9, 2.1), "alpha": (0.35, 0.45)}
    fit = ChinchillaFit(truth, intervals, n_runs=12, residuals=np.zeros(12))
    path = write_scaling_report(tmp_path, runs, fit)
    text = path.read_text()
    assert path.name == "scaling_report.md"
    for png in ("loss_vs_compute.png", "predicted_vs_actual.png", "isoflop.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in text
    held_out_row = [line for line in text.splitlines() if line.startswith("| run12 |")][-1]
    assert held_out_row.split("|")[4].strip() == "+0.00%"
    assert "`bad`" in text and "status diverged" in text
    # Fitted constants with their intervals next to Chinchilla's and KM's.
    assert "| E | 2 | 1.9 - 2.1 | 1.69 |" in text
    assert "| alpha | 0.4 | 0.35 - 0.45 | 0.34 | α_N = 0.076 |" in text
    with pytest.raises(ConfigError, match="share a directory name"):
        from_dict(SweepConfig, {"sizes": [{"d_model": 64}, {"d_model": 64, "mlp": "gelu"}]})


def test_shipped_recipe_loads():
    import lmforge
    from lmforge.config import build

    recipe = Path(lmforge.__file__).parent / "recipes" / "scaling_sweep.yaml"
    config = build(SweepConfig, recipe)
    assert len(config.plan()) == 13 and config.plan()[-1][2]
