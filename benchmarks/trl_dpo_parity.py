"""DPO loss parity with TRL: the same summed log-probabilities through lmforge's `dpo_loss` and
through TRL's `DPOTrainer._compute_loss`, in one run.

TRL computes its loss inside `_compute_loss` from a model's per-token log-probabilities; the
script runs that method with a stand-in trainer (only the attributes the method reads) and a
stand-in model that returns fixed per-token log-probabilities, so both sides see identical
inputs and no model or data set is involved. TRL lives in another environment (it pins its own
transformers/accelerate), so its side runs as a subprocess of --trl-python.

Compared: the sigmoid loss at several beta, and IPO on one-token completions (TRL divides IPO's
log-ratios by the completion length, a normalisation the IPO paper does not state; lmforge uses
the sums, as the paper's eq. 17 does; with one token the two agree).

Run: `python benchmarks/trl_dpo_parity.py --trl-python /path/to/venv-with-trl/bin/python`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmforge.adapt.dpo import dpo_loss  # noqa: E402

TRL_SIDE = r"""
import json, sys, types
from collections import defaultdict
import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer

case = json.load(sys.stdin)
per_token = torch.tensor(case["per_token"])          # (2B, T): chosen rows, then rejected rows
mask = torch.tensor(case["mask"], dtype=torch.long)   # (2B, T + 1): completion tokens
ref = torch.tensor(case["ref"])                        # (2B,) summed reference log-probs
B = per_token.shape[0] // 2


class Acc:
    device = torch.device("cpu")
    gather_for_metrics = gather = staticmethod(lambda t: t)
    unwrap_model = staticmethod(lambda m: m)


def model(**kw):
    n, t = per_token.shape
    return types.SimpleNamespace(
        log_probs=per_token, entropy=torch.zeros(n, t), mean_logits=torch.zeros(n, t),
        is_top1=torch.zeros(n, t, dtype=torch.bool))


out = {"trl": trl.__version__}
for name, loss_type, beta in case["runs"]:
    me = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=Acc(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    out[name] = DPOTrainer._compute_loss(me, model, inputs, return_outputs=False).item()
print(json.dumps(out))
"""


def case(batch: int, tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * batch, tokens, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(2 * batch, tokens + 1, dtype=torch.long)
    lengths = torch.randint(1, tokens + 1, (2 * batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        mask[row, tokens + 1 - n :] = 1  # the completion ends each row
    per_token = per_token * mask[:, 1:]  # TRL's model zeroes log-probs outside the completion
    ref = per_token.sum(1) + torch.randn(2 * batch, generator=g, dtype=torch.float64)
    return {"per_token": per_token.tolist(), "mask": mask.tolist(), "ref": ref.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trl-python", required=True, help="python of an environment with trl")
    args = ap.parse_args()
    runs = [[f"sigmoid beta={b}", "sigmoid", b] for b in (0.05, 0.1, 0.5, 2.0)]
    rows = []
    for tokens, extra in (
        (12, []),
        (1, [["ipo beta=0.1", "ipo", 0.1], ["ipo beta=0.5", "ipo", 0.5]]),
    ):
        c = case(batch=8, tokens=tokens, seed=tokens)
        c["runs"] = runs + extra
        done = subprocess.run(
            [args.trl_python, "-c", TRL_SIDE], input=json.dumps(c), capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"the TRL side failed:\n{done.stderr[-2000:]}")
        trl = json.loads(done.stdout.strip().splitlines()[-1])
        summed = torch.tensor(c["per_token"], dtype=torch.float64).sum(1)
        ref = torch.tensor(c["ref"], dtype=torch.float64)
        B = summed.shape[0] // 2
        for name, loss_type, beta in c["runs"]:
            ours = (
                dpo_loss(summed[:B], summed[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type)[
                    0
                ]
                .mean()
                .item()
            )
            rows.append((f"{name}, {tokens}-token completions", ours, trl[name], trl["trl"]))
    print("| loss | lmforge | TRL | abs. difference |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs, _ in rows:
        print(f"| {name} | {ours:.8f} | {theirs:.8f} | {abs(ours - theirs):.1e} |")
    print(f"TRL {rows[0][3]}")


if __name__ == "__main__":
    main()
