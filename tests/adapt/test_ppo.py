"""PPO / GRPO: KL estimators, GAE, clipped policy and value losses and group advantages against
straightforward loops; the adaptive KL controller; short runs of both algorithms; the KL guard."""

import json
import math

import pytest
import torch

from lmforge.adapt.optimize import AlignTrainConfig
from lmforge.adapt.ppo import (
    KLController,
    PPOConfig,
    gae,
    group_advantages,
    kl_estimate,
    policy_loss,
    ppo,
    value_loss,
)
from lmforge.adapt.reward import RewardModel, save_reward_model
from lmforge.errors import ConfigError, LmforgeError
from lmforge.tokenizer import train_bpe

torch.manual_seed(0)
LOGP = torch.randn(3, 6) - 2
REF = LOGP + 0.3 * torch.randn(3, 6)
# Responses at different offsets, as in a right-padded batch of prompt + response rows.
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]]).bool()


def test_kl_estimators():
    k1, k3 = kl_estimate(LOGP, REF, "k1"), kl_estimate(LOGP, REF, "k3")
    for i in range(3):
        for t in range(6):
            lp, rp = LOGP[i, t].item(), REF[i, t].item()
            assert k1[i, t].item() == pytest.approx(lp - rp, abs=1e-6)
            r = math.exp(rp - lp)
            assert k3[i, t].item() == pytest.approx((r - 1) - math.log(r), abs=1e-6)
    assert (k3 >= 0).all()
    # Both are unbiased: on samples from p, E[k1] = E[k3] = KL(p || q).
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert kl_estimate(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(
            exact, abs=0.01
        )


def _loop_gae(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[i, t]]
        r = [rewards[i, t].item() for t in pos]
        v = [values[i, t].item() for t in pos] + [0.0]
        running = 0.0
        for k in reversed(range(len(pos))):
            delta = r[k] + gamma * v[k + 1] - v[k]
            running = delta + gamma * lam * running
            adv[i, pos[k]] = running
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_a_loop(gamma, lam):
    rewards, values = torch.randn(3, 6) * MASK, torch.randn(3, 6)
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    ref_adv, ref_ret = _loop_gae(rewards, values, MASK, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-6) and torch.allclose(ret, ref_ret, atol=1e-6)


def test_clipped_losses_match_loops():
    new = LOGP + 0.4 * torch.randn(3, 6)
    adv, eps = torch.randn(3, 6), 0.2
    loss, clipfrac = policy_loss(new, LOGP, adv, MASK, eps)
    terms, clipped = [], 0
    for i, t in MASK.nonzero().tolist():
        ratio = math.exp(new[i, t].item() - LOGP[i, t].item())
        a = adv[i, t].item()
        unclipped, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        terms.append(max(unclipped, clip))
        clipped += clip > unclipped
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert clipfrac.item() == pytest.approx(clipped / len(terms))
    values, old, returns = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    terms = []
    for i, t in MASK.nonzero().tolist():
        v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
        vc = o + min(max(v - o, -eps), eps)
        terms.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
    vloss = value_loss(values, old, returns, MASK, eps)
    assert vloss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_group_advantages_and_kl_controller():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(scores, 4)
    g = scores[:4]
    assert torch.allclose(adv[:4], (g - g.mean()) / (g.std() + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that all agree teaches nothing
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # KL twice the target: error clipped to +0.2
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(5.4, 10)  # error -0.1
    assert ctl.coef == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = KLController(0.1, target=None, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.coef == 0.1


def _config(tmp_path, **kw) -> PPOConfig:
    train = AlignTrainConfig(steps=kw.pop("steps", 3), batch_size=4, lr=1e-3, warmup_steps=0)
    return PPOConfig(
        model="tiny",
        out=str(tmp_path / "ppo"),
        levels=[1],
        prompts_per_task=16,
        max_new_tokens=4,
        ppo_epochs=2,
        minibatch=4,
        group=2,
        eval_items=2,
        kl_samples=4,
        train=train,
        **kw,
    )


@pytest.mark.parametrize("algo, method", [("ppo", "full"), ("ppo", "lora"), ("grpo", "lora")])
def test_short_runs_log_every_phase(make_model, tokenizer, tmp_path, algo, method):
    model = make_model(0)
    result = ppo(_config(tmp_path, algo=algo, method=method), model=model, tokenizer=tokenizer)
    rows = [json.loads(x) for x in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference
    assert all(r["rollout_s"] > 0 and r["training_s"] > 0 for r in rows)
    assert ("value_loss" in rows[0]) == (algo == "ppo")
    assert result["before"]["kl"] == 0.0 and math.isfinite(result["after"]["kl"])
    assert (tmp_path / "ppo/model/config.yaml").exists()
    assert (tmp_path / "ppo/model/adapter.yaml").exists() == (method == "lora")


def _random_reward_model(make_model, tokenizer, path):
    rm = RewardModel(make_model(1))
    torch.nn.init.normal_(rm.head.proj.weight, std=5.0)
    save_reward_model(rm, path, tokenizer, {"template": "chatml", "max_len": 127})
    return str(path)


def test_kl_explosion_stops_and_keeps_the_last_good_checkpoint(make_model, tokenizer, tmp_path):
    # A reward model with a random head scores every response differently, so any update moves
    # the policy off the reference and a tiny kl_stop trips at step 2.
    rm = _random_reward_model(make_model, tokenizer, tmp_path / "rm")
    config = _config(
        tmp_path,
        method="full",
        reward="model",
        reward_model=rm,
        kl_stop=1e-6,
        kl_estimator="k3",
        save_every=1,
        steps=5,
    )
    with pytest.raises(LmforgeError, match="exploded at step 2") as e:
        ppo(config, model=make_model(0), tokenizer=tokenizer)
    assert "last good policy (step 1)" in str(e.value)
    assert (tmp_path / "ppo/checkpoint/model.safetensors").exists()


def test_reward_model_with_another_tokenizer_is_refused(make_model, tokenizer, tmp_path):
    other = train_bpe(["completely different text about cats and dogs"] * 20, 384)
    rm = _random_reward_model(make_model, other, tmp_path / "rm")
    config = _config(tmp_path, reward="model", reward_model=rm)
    with pytest.raises(ConfigError, match="another tokenizer"):
        ppo(config, model=make_model(0), tokenizer=tokenizer)
