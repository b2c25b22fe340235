"""`lmforge plan` and `lmforge scaling fit` from the command line."""

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.scaling.laws import CHINCHILLA, ChinchillaLaw


def test_plan_prints_the_compute_optimal_allocation(capsys):
    assert main(["plan", "--flops=5.76e23"]) == 0
    out = capsys.readouterr().out
    n_opt, d_opt = CHINCHILLA.compute_optimal(5.76e23)
    assert f"{n_opt:.3g}" in out and f"{d_opt:.3g}" in out
    assert main(["plan"]) == 1
    assert "exactly one of --flops" in capsys.readouterr().err


def test_fit_command_recovers_the_law_of_synthetic_runs(tmp_path, capsys):
    law = ChinchillaLaw(E=2.0, A=300.0, B=500.0, alpha=0.35, beta=0.3)
    rng = np.random.default_rng(0)
    for i, n in enumerate([1e6, 3e6, 1e7, 3e7]):
        for j, d in enumerate([1e7, 3e7, 1e8, 3e8]):
            run = tmp_path / "runs" / f"r{i}{j}"
            run.mkdir(parents=True)
            loss = float(law.loss(n, d)) * (1 + 0.002 * rng.standard_normal())
            summary = {
                "name": run.name,
                "status": "ok",
                "n_params": n,
                "n_params_non_embedding": n,
                "tokens": d,
                "flops": 6 * n * d,
                "final_val_loss": loss,
                "tokenizer_sha256": "abc",
            }
            (run / "summary.json").write_text(json.dumps(summary))
    assert main(["scaling", "fit", f"--runs=[{tmp_path}]", "--n_bootstrap=20"]) == 0
    out = capsys.readouterr().out
    assert "fitted on 16 runs" in out
    fitted = {k: float(v) for k, v in (p.split("=") for p in out.split("\n")[0].split()[4:])}
    assert fitted["E"] == pytest.approx(2.0, rel=0.05)
    assert fitted["alpha"] == pytest.approx(0.35, rel=0.15)
    assert (tmp_path / "scaling_report.md").is_file()


def test_fit_command_needs_enough_runs(tmp_path, capsys):
    assert main(["scaling", "fit", f"--runs=[{tmp_path}]"]) == 1
    assert "at least 5 usable runs" in capsys.readouterr().err
