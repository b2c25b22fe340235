"""Pipeline parallel (2 stages, 1F1B) and ZeRO-1 on 2 CPU ranks (gloo) against 1 rank."""

import json
import shutil

import pytest
import torch
from shards_helper import write_pattern_shards

import lmforge
from lmforge.data.shards import TokenShards
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.train import distributed
from lmforge.train.pipeline import Stage, check_split, owner_stages
from lmforge.train.trainer import TrainConfig, Trainer

STEPS = 10


def tiny_model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return Transformer(ModelConfig(**{**base, "dropout": 0.0, **kw}))


def trainer(data, out, *, model_kw=None, steps=STEPS, **kw):
    """Global batch 8 = 2 micro-batches of 4 on one rank, on each DDP rank one micro-batch of 4,
    and under the pipeline the 8 sequences cut into the same 2 micro-batches."""
    settings = dict(
        steps=steps, batch_size=4, global_batch_size=8, seq_len=16, lr=1e-2, schedule="constant",
        warmup_steps=2, eval_every=0, eval_batches=2, save_every=5, device="cpu",
    )  # fmt: skip
    config = TrainConfig(**{**settings, **kw})
    model = tiny_model(**(model_kw or {}))
    val = TokenShards(data, "validation")
    return Trainer(model, config, TokenShards(data, "train"), out, val_data=val)


RUNS = {  # name: (model settings, train settings)
    "pp": ({}, {"parallel": "pp"}),  # tied output layer: its copy on the last stage
    "pp_untied": ({"tie_embeddings": False, "position": "learned"}, {"parallel": "pp"}),
    "ddp": ({}, {}),
    "zero1": ({}, {"zero1": True}),
}


def optimizer_state_numel(optimizer):
    inner = getattr(optimizer, "optim", optimizer)  # ZeRO-1 keeps its shard's optimizer inside
    return sum(t.numel() for s in inner.state.values() for t in s.values() if t.dim() > 0)


def two_rank_scenarios(root):
    torch.set_num_threads(1)
    env = distributed.init("cpu", timeout_s=60)
    data = root / "data"
    for name, (model_kw, kw) in RUNS.items():
        t = trainer(data, root / name, model_kw=model_kw, **kw)
        t.fit()
        if name == "zero1":
            count = optimizer_state_numel(t.optimizer)
            (root / f"zero1_state_rank{env.rank}.json").write_text(json.dumps(count))
    for name in ("pp", "zero1"):  # resume both from step 5 on 2 ranks
        if env.is_main:
            dst = root / f"{name}_resume" / "checkpoints"
            dst.mkdir(parents=True)
            shutil.copytree(root / name / "checkpoints" / "step_0000005", dst / "step_0000005")
            (dst / "latest").write_text("step_0000005")
        distributed.barrier(env)
        trainer(data, root / f"{name}_resume", **RUNS[name][1]).fit()
    # Bad pipeline settings fail alike on both ranks, before any pipeline communication.
    errors = []
    for model_kw, kw in (({"n_layers": 3}, {}), ({}, {"global_batch_size": 4})):
        try:
            trainer(data, root / "bad", model_kw=model_kw, parallel="pp", **kw)
        except ConfigError as e:
            errors.append(str(e))
    distributed.shutdown()
    return errors


def losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


# 8 short runs on 2 ranks and 2 on 1 rank (35-75 s on 2 shared cores): in the default run,
# so CI checks pipeline parallel and ZeRO-1 against one rank.
def test_pipeline_and_zero1_match_one_rank(tmp_path):
    data = write_pattern_shards(tmp_path / "data")
    errors = distributed.launch(2, two_rank_scenarios, tmp_path)
    one = {}
    for model_kw in ({}, {"tie_embeddings": False, "position": "learned"}):
        key = "tied" if not model_kw else "untied"
        trainer(data, tmp_path / f"one_{key}", model_kw=model_kw).fit()
        one[key] = losses(tmp_path / f"one_{key}")
        assert list(one[key]) == list(range(1, STEPS + 1)) and one[key][STEPS] < one[key][1]
    reference = {"pp": "tied", "pp_untied": "untied", "ddp": "tied", "zero1": "tied"}
    for run, key in reference.items():  # same global batch: the same losses (fp32 sums)
        assert losses(tmp_path / run) == pytest.approx(one[key], rel=1e-5, abs=1e-6), run
    for run in ("pp", "zero1"):  # resumed at step 5 on 2 ranks: the same continuation
        full = losses(tmp_path / run)
        resumed = losses(tmp_path / f"{run}_resume")
        assert resumed == pytest.approx({s: full[s] for s in range(6, STEPS + 1)}, rel=1e-5)
    # Rank 0 saved the whole model, every stage's weights gathered; relative L2 per tensor, as
    # in test_distributed (Adam amplifies rounding differences where a gradient is ~0).
    for run, key in (("pp", "tied"), ("pp_untied", "untied")):
        expected = lmforge.load(tmp_path / f"one_{key}").state_dict()
        got = lmforge.load(tmp_path / run).state_dict()
        assert list(got) == list(expected)
        for name, p in expected.items():
            assert (p - got[name]).norm() <= 1e-3 * p.norm(), (run, name)
    # ZeRO-1: each rank holds about half of AdamW's two moments (whole tensors are assigned to
    # ranks, so the split is only as even as the tensor sizes allow).
    full_state = 2 * tiny_model().num_params()
    shares = [json.loads((tmp_path / f"zero1_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(shares) == full_state
    assert all(0.35 * full_state <= s <= 0.65 * full_state for s in shares), shares
    assert "n_layers=3 cannot be split evenly into 2 stages" in errors[0]
    assert "1 micro-batches per step is fewer than the 2 stages" in errors[1]


def test_stages_cover_the_model_once_with_the_model_s_names():
    model = tiny_model()  # 4 blocks, tied output layer
    first, last = Stage(model, 0, 2), Stage(model, 1, 2)
    names = {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()}
    model_names = {n for n, _ in model.named_parameters()}
    # The tied matrix appears as lm_head.weight on the last stage: the same tensor as embed.
    assert names == model_names | {"lm_head.weight"}
    assert last.lm_head.weight is first.embed.weight
    assert sorted(first.blocks) == ["0", "1"] and sorted(last.blocks) == ["2", "3"]
    owners = owner_stages(model, 2)
    assert owners["embed.weight"] == 0 and owners["norm.weight"] == 1
    assert owners["blocks.1.attn.qkv.weight"] == 0 and owners["blocks.2.attn.qkv.weight"] == 1
    # The two stages chained are the model's forward.
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(last(first(x)), model(x))


def test_pipeline_split_errors():
    check_split(4, 2, 2)
    with pytest.raises(ConfigError, match="n_layers=6 cannot be split evenly into 4 stages"):
        check_split(6, 4, 8)
    with pytest.raises(ConfigError, match="3 micro-batches per step is fewer than the 4 stages"):
        check_split(8, 4, 3)
