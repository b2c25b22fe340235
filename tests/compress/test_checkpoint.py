"""Quantized checkpoints: save, load through lmforge.load, `lmforge quantize` for every method."""

import pytest
import torch
import yaml

import lmforge
from lmforge.cli import main
from lmforge.compress.quantized_model import quantize_model, save_quantized
from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import save_model

TEXTS = [
    "Quantization maps floating point weights to small integers with a scale. " * 4,
    "The model reads every weight once for each generated token. " * 4,
    "Group-wise scales follow the weights more closely than one scale per row. " * 4,
] * 30


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_bpe(TEXTS, 300, min_frequency=1)
    config = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    path = tmp_path_factory.mktemp("q") / "fp"
    save_model(Transformer(config).eval(), path, tokenizer=tokenizer)
    return path


@pytest.mark.parametrize(
    "method,bits", [("rtn", 8), ("rtn", 4), ("nf4", 4), ("llm_int8", 8), ("w8a8", 8)]
)
def test_save_load_roundtrip(fp_checkpoint, tmp_path, method, bits):
    model = quantize_model(lmforge.load(fp_checkpoint), method, bits, 32)
    save_quantized(model, tmp_path / "q")
    spec = yaml.safe_load((tmp_path / "q" / "quantization.yaml").read_text())
    assert spec["method"] == method and spec["bits"] == bits and "lm_head" in spec["layers"]
    loaded = lmforge.load(tmp_path / "q")
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    stored = {k: v.dtype for k, v in loaded.state_dict().items()}
    assert torch.float32 not in {
        stored[k] for k in stored if k.endswith(("qweight", "codes"))
    }  # integer codes on disk, not fp32


def test_quantized_checkpoint_is_smaller(fp_checkpoint, tmp_path):
    model = quantize_model(lmforge.load(fp_checkpoint), "rtn", 4, 32, keep_lm_head=True)
    save_quantized(model, tmp_path / "q4")
    linear = sum(
        m.weight.numel()
        for n, m in lmforge.load(fp_checkpoint).named_modules()
        if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)
    )
    saved = (fp_checkpoint / "model.safetensors").stat().st_size
    quantized = (tmp_path / "q4" / "model.safetensors").stat().st_size
    # int4 codes (0.5 B) + fp32 scale and zero per 32 inputs (0.25 B) instead of 4 B a weight.
    assert saved - quantized == pytest.approx(linear * (4 - 0.5 - 0.25), rel=0.02)


@pytest.mark.parametrize(
    "method,bits", [("rtn", 4), ("gptq", 4), ("nf4", 4), ("llm_int8", 8), ("smoothquant", 8)]
)
def test_cli_quantize_every_method(fp_checkpoint, tmp_path, method, bits):
    corpus = tmp_path / "calib.txt"
    corpus.write_text(" ".join(TEXTS))
    out = tmp_path / method
    args = [
        "quantize",
        f"--model={fp_checkpoint}",
        f"--method={method}",
        f"--bits={bits}",
        "--group_size=32",
        f"--calibration=[{corpus}]",
        "--calibration_samples=4",
        "--calibration_seq_len=32",
        f"--out={out}",
    ]
    assert main(args) == 0
    model = lmforge.load(out)
    assert model.quantization.method == method
    assert (
        lmforge.load_tokenizer(out).vocab_size == lmforge.load_tokenizer(fp_checkpoint).vocab_size
    )
    # Quantizing it again is refused.
    assert main(["quantize", f"--model={out}", f"--out={tmp_path / 'again'}"]) == 1
    with pytest.raises(CheckpointError, match="already quantized"):
        from lmforge.compress.commands import QuantizeConfig, quantize_command

        quantize_command(QuantizeConfig(model=str(out), out=str(tmp_path / "again")))


def test_cli_errors(fp_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    base = ["quantize", f"--model={fp_checkpoint}", f"--out={tmp_path / 'x'}"]
    assert main([*base, "--method=rtn", "--bits=4", "--group_size=48"]) == 1
    assert "group_size 48 does not divide" in capsys.readouterr().err
    assert (
        main([*base, "--method=gptq", "--bits=4", "--group_size=32", f"--calibration=[{short}]"])
        == 1
    )
    assert "calibration data is too short" in capsys.readouterr().err
    assert main([*base, "--method=smoothquant", f"--calibration=[{empty}]"]) == 1
    assert "is empty" in capsys.readouterr().err


def test_corrupt_quantization_record(fp_checkpoint, tmp_path):
    model = quantize_model(lmforge.load(fp_checkpoint), "rtn", 8)
    save_quantized(model, tmp_path / "q")
    (tmp_path / "q" / "quantization.yaml").write_text("method: magic\nbits: 3\ngroup_size: 1\n")
    with pytest.raises(CheckpointError, match="method must be one of"):
        lmforge.load(tmp_path / "q")
