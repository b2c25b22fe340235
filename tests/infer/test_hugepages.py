"""Moving weights into a huge-page arena changes where they live, never what the model computes."""

from __future__ import annotations

import copy

import torch

from lmforge.infer.hugepages import move_to_huge_pages
from lmforge.interop.hf import export_hf, load_hf
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import load_model, save_model


def tiny() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    return Transformer(config).eval()


def test_outputs_ties_and_saving_survive_the_move(tmp_path):
    model = tiny()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids)
    params = dict(model.named_parameters())
    move_to_huge_pages(model)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    assert model.lm_head.weight is model.embed.weight  # still tied
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # one arena
    # Block linears are stored column-major (their transpose is contiguous), the tied output
    # layer / embedding row-major; shapes and values are unchanged.
    w = model.blocks[0].mlp.w_out.weight
    assert w.shape == params["blocks.0.mlp.w_out.weight"].shape and w.t().is_contiguous()
    assert model.embed.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert move_to_huge_pages(model) == move_to_huge_pages(model)  # later calls: no-op
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages
    with torch.no_grad():
        assert torch.equal(load_model(save_model(model, tmp_path / "ckpt"))(ids), before)
        assert torch.equal(copy.deepcopy(model)(ids), before)
    export_hf(model, tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(load_hf(tmp_path / "hf")(ids), before, atol=1e-5)


def test_training_after_the_move_updates_the_weights():
    model = tiny().train()
    move_to_huge_pages(model)
    before = model.blocks[0].mlp.w_in.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 64, (2, 9))).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(model.blocks[0].mlp.w_in.weight, before)
