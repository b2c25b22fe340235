"""Pruning: exact sparsity against a brute-force ranking, structured pruning against the original
model with the same heads/channels zeroed, Taylor importance against finite differences."""

import copy
import json

import numpy as np
import pytest
import torch

import lmforge
from lmforge.compress.prune import (
    PruneConfig,
    magnitude_prune,
    prunable_weights,
    prune_command,
    recover,
    sparsity,
    structured_prune,
    unit_importance,
)
from lmforge.data.shards import write_shards
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import load_model, save_model
from lmforge.train.trainer import TrainConfig


def model_of(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    settings = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=48)
    settings.update(init_std=0.1)
    settings.update(overrides)
    return Transformer(ModelConfig(**settings)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_global_magnitude_pruning_reaches_the_sparsity_exactly(target):
    model = model_of()
    before = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    masks = magnitude_prune(model, target)
    values = np.concatenate([w.abs().flatten().numpy() for w in before.values()])
    n_zero = round(target * values.size)
    assert sparsity(model) == n_zero / values.size
    # Brute force: the pruned entries are the n_zero smallest magnitudes of all matrices.
    pruned = np.concatenate([(~masks[n]).flatten().numpy() for n in before])
    assert np.sort(values)[:n_zero].tolist() == np.sort(values[pruned]).tolist()
    for name, w in prunable_weights(model).items():
        assert torch.equal(w, before[name] * masks[name])


def test_per_layer_pruning_prunes_each_matrix_to_the_sparsity():
    model = model_of()
    before = {n: w.detach().abs().clone() for n, w in prunable_weights(model).items()}
    magnitude_prune(model, 0.25, scope="per_layer")
    for name, w in prunable_weights(model).items():
        zero = w == 0
        assert int(zero.sum()) == round(0.25 * w.numel())
        assert before[name][zero].max() <= before[name][~zero].min()


def test_ties_still_give_the_exact_count():
    model = model_of()
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w.fill_(0.5)
    magnitude_prune(model, 0.4)
    n = sum(w.numel() for w in prunable_weights(model).values())
    assert sparsity(model) == round(0.4 * n) / n


def test_embeddings_and_norms_stay_dense():
    model = model_of()
    embed = model.embed.weight.detach().clone()
    magnitude_prune(model, 0.8)
    assert torch.equal(model.embed.weight, embed)
    assert bool((model.norm.weight != 0).all())


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity_targets(bad):
    with pytest.raises(ConfigError, match="sparsity must be in"):
        magnitude_prune(model_of(), bad)
    with pytest.raises(ConfigError, match="head_sparsity must be in"):
        structured_prune(model_of(), head_sparsity=bad)
    with pytest.raises(ConfigError, match="scope 'local'"):
        magnitude_prune(model_of(), 0.5, scope="local")


def test_recovery_fine_tune_keeps_pruned_weights_at_zero():
    model = model_of().train()
    masks = magnitude_prune(model, 0.5)
    before = {n: w.detach().clone() for n, w in prunable_weights(model).items()}

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        for _ in range(5):
            loss = m(IDS).logsumexp(-1).mean() - m(IDS)[..., 0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    losses = recover(model, train, masks)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert sparsity(model) == 0.5
    for name, w in prunable_weights(model).items():
        assert not torch.equal(w[masks[name]], before[name][masks[name]])  # the rest trained


def expected_heads(scores: torch.Tensor, keep: int, kv_heads: int) -> list[int]:
    """Written out: MHA keeps the top `keep` heads; GQA the top keep/kv of each group."""
    n = scores.numel()
    if kv_heads == n:
        return sorted(np.argsort(-scores.numpy(), kind="stable")[:keep].tolist())
    group = n // kv_heads
    out = []
    for g in range(kv_heads):
        part = scores[g * group : (g + 1) * group].numpy()
        out += [g * group + i for i in np.argsort(-part, kind="stable")[: keep // kv_heads]]
    return sorted(out)


def zeroed_reference(model, heads_kept, channels_kept):
    """The original model with every other head's output columns and every other channel's
    down-projection column set to zero."""
    ref = copy.deepcopy(model)
    c = model.config
    with torch.no_grad():
        for block, heads, channels in zip(ref.blocks, heads_kept, channels_kept):
            out = block.attn.out.weight.view(c.d_model, c.n_heads, c.dim_head)
            drop = [h for h in range(c.n_heads) if h not in heads]
            out[:, drop] = 0
            drop = [j for j in range(c.ff_dim) if j not in channels]
            block.mlp.w_out.weight[:, drop] = 0
    return ref


@pytest.mark.parametrize(
    ("overrides", "head_sparsity"),
    [
        ({}, 0.5),  # MHA: k/v heads go with their query heads
        ({"n_kv_heads": 2}, 0.5),  # GQA: one query head left in each group
        ({"n_kv_heads": 1}, 0.25),  # MQA
        ({"mlp": "gelu", "bias": True, "position": "learned", "norm": "layernorm"}, 0.25),
    ],
)
def test_structured_pruning_equals_the_model_with_those_units_zeroed(overrides, head_sparsity):
    model = model_of(**overrides)
    c = model.config
    g = torch.Generator().manual_seed(3)
    scores = (
        [torch.rand(c.n_heads, generator=g) for _ in model.blocks],
        [torch.rand(c.ff_dim, generator=g) for _ in model.blocks],
    )
    pruned, kept = structured_prune(
        model, head_sparsity=head_sparsity, mlp_sparsity=0.25, importance=scores
    )
    keep = c.n_heads - round(head_sparsity * c.n_heads)
    heads = [expected_heads(s, keep, c.kv_heads) for s in scores[0]]
    channels = [sorted(np.argsort(-s.numpy(), kind="stable")[:36].tolist()) for s in scores[1]]
    assert [k.tolist() for k in kept["heads"]] == heads
    assert [k.tolist() for k in kept["channels"]] == channels
    p = pruned.config
    assert (p.n_heads, p.d_ff, p.dim_head) == (keep, 36, c.dim_head)
    assert p.kv_heads == (keep if c.kv_heads == c.n_heads else c.kv_heads)
    assert pruned.num_params() < model.num_params()
    expected = logits(zeroed_reference(model, heads, channels), IDS)
    torch.testing.assert_close(logits(pruned, IDS), expected, rtol=1e-5, atol=1e-5)


def test_pruned_model_is_an_ordinary_checkpoint(tmp_path):
    pruned, _ = structured_prune(model_of(n_kv_heads=2), head_sparsity=0.5, mlp_sparsity=0.5)
    save_model(pruned, tmp_path / "p")
    again = load_model(tmp_path / "p")
    assert again.config == pruned.config
    torch.testing.assert_close(logits(again, IDS), logits(pruned, IDS), rtol=0, atol=0)


def test_structured_targets_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="does not split evenly over the 2 k/v groups"):
        structured_prune(model_of(n_kv_heads=2), head_sparsity=0.25)
    with pytest.raises(ConfigError, match="every head or every MLP channel"):
        structured_prune(model_of(n_heads=1, d_model=32), head_sparsity=0.6)
    with pytest.raises(ConfigError, match="calibration batches are empty"):
        unit_importance(model_of(), [])


def gate_gradients(model, x, y):
    """dL/dxi of gates xi = 1 multiplying each head's output and each MLP channel, by autograd
    through gates hooked into a copy of the model (Michel et al. 2019's definition)."""
    m, c = copy.deepcopy(model), model.config
    gates = []
    for block in m.blocks:
        head_gate = torch.ones(c.n_heads, requires_grad=True)
        channel_gate = torch.ones(c.ff_dim, requires_grad=True)
        gates.append((head_gate, channel_gate))

        def gate_heads(_mod, args, g=head_gate):
            h = args[0]
            return ((h.unflatten(-1, (c.n_heads, c.dim_head)) * g[:, None]).flatten(-2),)

        block.attn.out.register_forward_pre_hook(gate_heads)
        block.mlp.w_out.register_forward_pre_hook(lambda _mod, args, g=channel_gate: (args[0] * g,))
    out = m(x)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
    return [g.grad for g, _ in gates], [g.grad for _, g in gates]


def test_taylor_importance_is_the_gradient_of_a_unit_gate():
    # Summed over sequences of |dL/dxi| for each sequence on its own; the batch loss is the
    # mean over the batch, so a sequence's share of its gradient is 1/B of its own.
    model = model_of()
    x, y = IDS[:, :-1], IDS[:, 1:]
    heads, channels = unit_importance(model, [(x, y)])
    per_sequence = [gate_gradients(model, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    for layer in range(model.config.n_layers):
        for kind, scores in ((0, heads), (1, channels)):
            expected = sum(g[kind][layer].abs() for g in per_sequence) / len(x)
            torch.testing.assert_close(scores[layer], expected, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def checkpoint_and_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_cmd")
    texts = [f"item {i} is bigger than item {i - 1} and smaller than {i + 1}." for i in range(300)]
    tokenizer = train_bpe(texts, 300, min_frequency=1)
    write_shards(texts, tokenizer, root / "shards", val_fraction=0.1)
    model = model_of(vocab_size=320, max_seq_len=64, n_kv_heads=2)
    save_model(model, root / "ckpt", tokenizer=tokenizer)
    return root


def test_prune_command_structured_with_recovery(tmp_path, checkpoint_and_shards):
    root = checkpoint_and_shards
    stats = prune_command(
        PruneConfig(
            model=str(root / "ckpt"),
            out=str(tmp_path / "run"),
            method="structured",
            head_sparsity=0.5,
            mlp_sparsity=0.5,
            data=str(root / "shards"),
            calibration_batches=2,
            seq_len=32,
            recover=True,
            train=TrainConfig(
                steps=8,
                batch_size=4,
                seq_len=32,
                lr=3e-3,
                warmup_steps=0,
                eval_every=0,
                save_every=0,
                device="cpu",
            ),
        )
    )
    pruned = lmforge.load(tmp_path / "run")
    assert (pruned.config.n_heads, pruned.config.d_ff) == (2, 24)
    assert stats["params_after"] == pruned.num_params() < stats["params_before"]
    assert stats["val_loss_recovered"] < stats["val_loss_pruned"]
    saved = json.loads((tmp_path / "run" / "prune.json").read_text())
    assert saved["config"]["n_heads"] == 2


def test_prune_command_magnitude_keeps_its_zeros_through_recovery(tmp_path, checkpoint_and_shards):
    root = checkpoint_and_shards
    train = TrainConfig(
        steps=4, batch_size=2, seq_len=32, warmup_steps=0, eval_every=0, save_every=0, device="cpu"
    )
    config = PruneConfig(
        model=str(root / "ckpt"),
        out=str(tmp_path / "run"),
        sparsity=0.6,
        data=str(root / "shards"),
        seq_len=32,
        recover=True,
        train=train,
    )
    stats = prune_command(config)
    assert stats["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert sparsity(lmforge.load(tmp_path / "run")) == pytest.approx(0.6, abs=1e-4)
    with pytest.raises(ConfigError, match="--recover needs --data"):
        prune_command(PruneConfig(model=str(root / "ckpt"), recover=True))
