import math

import pytest
import torch

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.train.adamw8bit import BLOCK, AdamW8bit, BlockQuantized, dynamic_tree_codes
from lmforge.train.optim import (
    Lamb,
    Lion,
    learning_rate,
    make_optimizer,
    ramped_micro_batches,
    wsd_schedule,
)
from lmforge.train.trainer import TrainConfig


def regression_problem(seed=0):
    """A least-squares problem big enough for 8-bit states (weights >= 4096 values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=g)
    w_true = torch.randn(128, 64, generator=g) / 8
    y = x @ w_true
    return x, y


def trajectory(make, steps=60, seed=0):
    x, y = regression_problem(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(128, 64)
    opt = make(model)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses, model.weight.detach().clone()


def test_dynamic_tree_codes_cover_minus_one_to_one():
    signed, unsigned = dynamic_tree_codes(True), dynamic_tree_codes(False)
    assert len(signed) <= 256 and len(unsigned) == 256
    assert signed.min() == -1 and signed.max() == 1 and 0 in signed.tolist()
    assert unsigned.min() == 0 and unsigned.max() == 1
    assert torch.all(signed[1:] > signed[:-1]) and torch.all(unsigned[1:] > unsigned[:-1])
    # The smallest non-zero magnitude is 10^-6 (signed: 6 zero bits) resp. 10^-7 (unsigned).
    assert 1e-7 < signed[signed > 0].min() < 1e-6 and 1e-8 < unsigned[1] < 1e-7


def test_block_quantization_error_is_relative_to_each_block():
    q = BlockQuantized(dynamic_tree_codes(True))
    x = torch.randn(3 * BLOCK + 5)
    x[:BLOCK] *= 1e-4  # one block of tiny values must keep its own scale
    index, absmax = q.quantize(x)
    assert index.dtype == torch.uint8 and absmax.shape == (4,)
    y = q.dequantize(index, absmax, x.shape)
    for block in range(4):
        part = slice(block * BLOCK, (block + 1) * BLOCK)
        err = (y[part] - x[part]).abs().max() / x[part].abs().max()
        assert err < 0.02, block  # the dynamic type's coarsest step near the block maximum
    # The nearest code is chosen: no other code is closer (brute force over all 255 codes).
    codes = q.codes * absmax[0]
    brute = codes[(x[:100, None] - codes[None]).abs().argmin(1)]
    torch.testing.assert_close(y[:100], brute)


def test_adamw8bit_follows_the_fp32_adamw_trajectory():
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref_losses, ref_w = trajectory(lambda m: torch.optim.AdamW(m.parameters(), **kw))
    q_losses, q_w = trajectory(lambda m: AdamW8bit(m.parameters(), **kw))
    # Stated tolerance: weights within 2% (relative L2) and losses within 5% after 60 steps.
    assert (q_w - ref_w).norm() / ref_w.norm() < 0.02
    assert q_losses[-1] == pytest.approx(ref_losses[-1], rel=0.05)
    assert q_losses[-1] < 0.05 * q_losses[0]
    opt = AdamW8bit(torch.nn.Linear(128, 64).parameters())
    opt.param_groups[0]["params"][0].grad = torch.ones(64, 128)
    opt.param_groups[0]["params"][1].grad = torch.ones(64)
    opt.step()
    states = list(opt.state.values())
    assert states[0]["exp_avg_q"].dtype == torch.uint8  # the 8192-value weight: 8-bit
    assert states[1]["exp_avg"].dtype == torch.float32  # the 64-value bias: fp32


def test_every_optimizer_trains_and_adafactor_matches_adamw_loss():
    finals = {}
    # Adafactor's lr caps a step relative to each weight's RMS (Shazeer & Stern 2018), LAMB's a
    # step relative to the tensor norm: both want a larger number than AdamW; Lion a smaller one.
    for name, lr in (("adamw", 1e-2), ("adafactor", 1e-1), ("lamb", 1e-1), ("lion", 1e-2)):
        losses, _ = trajectory(
            lambda m, n=name, lr=lr: make_optimizer(
                n, m, lr=lr, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8
            ),
            steps=60,
        )
        assert losses[-1] < 0.05 * losses[0], name
        finals[name] = losses[-1]
    # Stated tolerance: Adafactor ends within 1.5x AdamW's loss (+1e-3) on the same problem.
    assert finals["adafactor"] <= 1.5 * finals["adamw"] + 1e-3


def test_lamb_step_is_the_trust_ratio_times_adam_direction():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||p|| = 5
    p.grad = torch.tensor([1.0, -2.0])
    Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=0.0).step()
    # First step: m_hat = g, v_hat = g^2, so the Adam direction is sign(g), norm sqrt(2).
    ratio = 5 / math.sqrt(2)
    torch.testing.assert_close(p.detach(), torch.tensor([3 - 0.1 * ratio, 4 + 0.1 * ratio]))


def test_lion_moves_each_weight_by_lr():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    p.grad = torch.tensor([0.5, -1e-6, 0.0])
    Lion([p], lr=0.01, betas=(0.9, 0.99)).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.99, 1.01, 1.0]))


def test_wsd_and_constant_schedules():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert wsd_schedule(4, decay_fraction=0.2, **kw) == pytest.approx(0.5)
    assert wsd_schedule(50, decay_fraction=0.2, **kw) == 1.0
    assert wsd_schedule(79, decay_fraction=0.2, **kw) == 1.0
    assert wsd_schedule(90, decay_fraction=0.2, **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert wsd_schedule(100, decay_fraction=0.2, **kw) == pytest.approx(0.1)
    const = dict(kw, decay_fraction=0.2)
    assert learning_rate("constant", 99, **const) == 1.0
    assert learning_rate("constant", 0, **const) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        learning_rate("linear", 0, **const)


def test_batch_ramp_grows_linearly_by_tokens_in_granules():
    kw = dict(full=64, start=8, ramp_tokens=1000, granule=8)
    assert ramped_micro_batches(0, **kw) == 1
    assert ramped_micro_batches(500, **kw) == 4  # 8 + 56 * 0.5 = 36 sequences -> 4 x 8
    assert ramped_micro_batches(999, **kw) == 7
    assert ramped_micro_batches(1000, **kw) == 8
    assert ramped_micro_batches(0, full=64, start=0, ramp_tokens=0, granule=8) == 8


def test_train_config_rejects_bad_optimisation_settings():
    with pytest.raises(ConfigError, match="optimizer: 'adam' is not one of.*did you mean 'adamw'"):
        from_dict(TrainConfig, {"optimizer": "adam"})
    with pytest.raises(ConfigError, match="global_batch_size=10 is not a multiple of batch_size=4"):
        from_dict(TrainConfig, {"global_batch_size": 10, "batch_size": 4})
    with pytest.raises(ConfigError, match="batch_ramp_start needs batch_ramp_tokens"):
        from_dict(TrainConfig, {"batch_ramp_start": 8})
    with pytest.raises(ConfigError, match="spike_factor=0.5 would flag ordinary losses"):
        from_dict(TrainConfig, {"spike_factor": 0.5})
    with pytest.raises(ConfigError, match="keep more checkpoints"):
        from_dict(TrainConfig, {"spike_factor": 2, "save_every": 10, "spike_rollback_steps": 50})
