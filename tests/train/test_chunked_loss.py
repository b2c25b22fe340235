"""The chunked output layer + cross-entropy against F.cross_entropy on full logits (loss and
gradients, frozen and trainable output weight), and causal_lm_loss's choice of path."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.train.objectives import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy


def _reference(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 0])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_matches_full_logits_loss_and_gradients(chunk_rows, weight_trains):
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.5).requires_grad_(weight_trains)
    t = torch.randint(0, 300, (50,))
    t[::4] = IGNORE_INDEX  # ignored rows add neither loss nor gradient
    ref = _reference(h, w, t)
    ref_grads = torch.autograd.grad(ref * 3.0, [h, w] if weight_trains else [h])
    loss = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss * 3.0, [h, w] if weight_trains else [h])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_all_targets_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    t = torch.full((4,), IGNORE_INDEX)
    assert torch.isnan(_reference(h, w, t)) and torch.isnan(linear_cross_entropy(h, w, t))
    assert torch.isnan(linear_cross_entropy(h.detach(), w, t))


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 hidden rows but 4 targets"):
        linear_cross_entropy(
            torch.randn(3, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
        )


@pytest.mark.parametrize("frozen", [True, False])
def test_causal_lm_loss_chunked_equals_full_logits(frozen):
    # Full fine-tuning (tied, trainable output weight) and PEFT-style frozen base alike.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4)).train()
    model.requires_grad_(not frozen)
    if frozen:  # something upstream of the frozen output layer still trains
        model.blocks[1].mlp_norm.weight.requires_grad_(True)
    x, y = torch.randint(0, 97, (2, 2, 12)).unbind(0)
    y[0, :3] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(x)
    assert torch.equal(model(x, hidden_only=True), model(x, return_hidden=True)[1])
    ref = F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1), ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, params)
    loss = causal_lm_loss(model, (x, y))
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_forward_hook_on_the_model_gets_logits():
    # A hook on the model (e.g. the z-loss) may read the logits: then no chunked path.
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4)).train()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
    causal_lm_loss(model, torch.randint(0, 97, (2, 2, 5)).unbind(0))
    assert seen == [97]
