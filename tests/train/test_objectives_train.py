"""Every objective trains a tiny model of its architecture through `lmforge pretrain`: the loss
goes down within a few steps."""

import inspect
import json

import pytest
from test_objectives_data import write_document_shards

from lmforge.config import build
from lmforge.errors import ConfigError
from lmforge.model import Transformer
from lmforge.train.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.skipif(
    "prefix_len" not in inspect.signature(Transformer.forward).parameters,
    reason="needs the prefix / encoder / encoder-decoder Transformer (issue 3, model side)",
)

TINY = [
    "--model.vocab_size=320",
    "--model.d_model=32",
    "--model.n_layers=1",
    "--model.n_heads=2",
    "--model.max_seq_len=64",
]
TRAIN = [
    "--train.steps=25",
    "--train.batch_size=8",
    "--train.seq_len=48",
    "--train.lr=1e-2",
    "--train.warmup_steps=3",
    "--train.eval_every=25",
    "--train.eval_batches=2",
    "--train.save_every=0",
    "--train.log_every=1",
    "--train.device=cpu",
]
ARCHS = {
    "causal": [],
    "prefix": ["--model.arch=prefix"],
    "encoder_decoder": ["--model.arch=encoder_decoder", "--model.position=t5_bias"],
    "encoder": [
        "--model.arch=encoder",
        "--model.nsp_head=true",
        "--model.type_vocab_size=2",
        "--model.position=learned",
        "--model.norm=layernorm",
        "--model.mlp=gelu",
    ],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_document_shards(tmp_path_factory.mktemp("docs"), pattern=True)


@pytest.mark.parametrize(
    "objective, arch",
    [
        ("causal", "causal"),
        ("prefix", "prefix"),
        ("span", "encoder_decoder"),
        ("span", "causal"),
        ("ul2", "prefix"),
        ("ul2", "encoder_decoder"),
        ("mlm", "encoder"),
    ],
)
def test_objective_trains(shards, tmp_path, objective, arch):
    args = [f"--data={shards}", f"--out={tmp_path}", f"--objective={objective}"]
    summary = pretrain(build(PretrainConfig, None, args + TINY + ARCHS[arch] + TRAIN))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open()]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # At least the step from uniform guessing towards the corpus's unigram distribution, which
    # every objective reaches in a few steps (MLM + NSP: ln 320 + ln 2 -> ln 197 + ln 2).
    assert last < first - 0.25, (objective, arch, losses)
    assert summary["final_val_loss"] < first


def test_incompatible_objective_fails_at_config_load(shards):
    with pytest.raises(ConfigError, match="objective='mlm'.*model.arch='encoder'"):
        build(PretrainConfig, None, [f"--data={shards}", "--objective=mlm"])
    with pytest.raises(ConfigError, match="nsp=true.*model.nsp_head"):
        build(
            PretrainConfig,
            None,
            ["--objective=mlm", "--model.arch=encoder", "--objective_options.nsp=true"],
        )
