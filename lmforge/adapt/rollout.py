"""Responses of a policy through lmforge's batched generation engine (KV cache, continuous
batching), and what the alignment commands measure with them: verifier reward, exact match and
refusal rate of greedy answers, and the KL divergence to the reference on sampled answers."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.adapt.instruct import Example
from lmforge.adapt.peft import PeftConfig, add_adapter, disabled_adapters
from lmforge.adapt.preference import Pair, VerifiablePrompt
from lmforge.adapt.sequences import Encoded, from_generation, pad, stop_token, token_logprobs
from lmforge.adapt.sft import prompt_ids
from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams


@dataclass
class Rollout:
    """One sampled response: its prompt and response tokens (stop token kept) and text."""

    prompt: list[int]
    encoded: Encoded
    text: str
    stopped: bool


def sample(
    model: nn.Module,
    tokenizer,
    template: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int | None = 0,
    max_batch: int = 64,
) -> list[Rollout]:
    """One response per prompt (repeat a prompt for several), all prompts in one engine so the
    decode steps are batched; temperature 0 is greedy."""
    stop = stop_token(tokenizer, template)
    ids = [prompt_ids(Example.from_instance(p, ""), tokenizer, template) for p in prompts]
    longest = max(len(p) for p in ids)
    # Prompt + response + stop token must fit one forward pass when the responses are scored.
    context = min(model.config.max_seq_len - 1, longest + max_new_tokens)
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=(stop,), seed=seed
    )
    was_training = model.training
    model.eval()
    engine = Engine(
        model,
        None,
        max_batch=min(max_batch, len(ids)),
        max_context=context,
        prefix_cache_tokens=0,
        eos_id=stop,
    )
    generations = engine.generate(ids, params)
    model.train(was_training)
    return [
        Rollout(
            p,
            from_generation(p, g.tokens, g.finish_reason == "stop", stop),
            tokenizer.decode(g.tokens, skip_special_tokens=True),
            g.finish_reason == "stop",
        )
        for p, g in zip(ids, generations)
    ]


class Reference:
    """The frozen reference policy. A PEFT policy's reference is its own base with the adapters
    switched off (no second copy of the weights); a fully fine-tuned policy's is a frozen copy
    taken when the Reference is made."""

    def __init__(self, model: nn.Module) -> None:
        peft = getattr(model, "peft", None)
        self.model = model
        self.copy = None
        if peft is None or peft.active is None:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            return token_logprobs(self.copy, input_ids)
        with disabled_adapters(self.model):
            return token_logprobs(self.model, input_ids)


@torch.no_grad()
def sequence_kl(
    model: nn.Module, reference: Reference, rollouts: Sequence[Rollout], pad_id: int = 0
) -> torch.Tensor:
    """Per response: sum over its tokens of log pi(y_t) - log pi_ref(y_t), which on responses
    sampled from pi is an unbiased estimate of KL(pi || pi_ref) in nats (the k1 estimator)."""
    device = next(model.parameters()).device
    batch = pad([r.encoded for r in rollouts], pad_id, device)
    diff = token_logprobs(model, batch["input_ids"]) - reference.token_logprobs(batch["input_ids"])
    return (diff * batch["response_mask"]).sum(-1)


def evaluate(
    model: nn.Module,
    tokenizer,
    template: str,
    prompts: Sequence[VerifiablePrompt],
    *,
    max_new_tokens: int,
    reference: Reference | None = None,
    kl_samples: int = 0,
    seed: int = 0,
) -> dict:
    """Greedy answers to held-out verifiable prompts: mean verifier reward, exact match (task
    prompts) and refusal rate (harmful prompts); with a reference, the KL to it on kl_samples
    responses sampled at temperature 1 (mean and standard error, nats per response)."""
    greedy = sample(
        model,
        tokenizer,
        template,
        [p.prompt for p in prompts],
        max_new_tokens=max_new_tokens,
        temperature=0,
    )
    rewards = [p.reward(r.text) for p, r in zip(prompts, greedy)]
    tasks = [x for p, x in zip(prompts, rewards) if p.kind == "task"]
    harmful = [x for p, x in zip(prompts, rewards) if p.kind == "harmful"]
    out = {
        "reward": sum(rewards) / max(1, len(rewards)),
        "exact_match": sum(tasks) / len(tasks) if tasks else None,
        "refusal_rate": sum(harmful) / len(harmful) if harmful else None,
        "samples": [
            {"prompt": p.prompt, "gold": p.answer, "output": r.text, "reward": x}
            for p, r, x in zip(prompts, greedy, rewards)
        ],
    }
    if reference is not None and kl_samples:
        chosen = [prompts[i % len(prompts)].prompt for i in range(kl_samples)]
        sampled = sample(
            model,
            tokenizer,
            template,
            chosen,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            seed=seed,
        )
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        kl = sequence_kl(model, reference, sampled, pad_id)
        out["kl"] = float(kl.mean())
        out["kl_stderr"] = float(kl.std() / len(kl) ** 0.5) if len(kl) > 1 else 0.0
    return out


def policy_pairs(
    model: nn.Module,
    tokenizer,
    template: str,
    prompts: Sequence[VerifiablePrompt],
    *,
    samples: int,
    max_new_tokens: int,
    gold: Sequence[str] | None = None,
    seed: int = 0,
) -> list[Pair]:
    """Preference pairs from the policy's own samples, judged by the verifier: for each prompt,
    a right answer (a sampled one, else `gold`) over the wrong answer sampled most often.
    Pairs on the policy's own mistakes move it where it errs, where rule-written wrong answers
    may be ones it never makes (on-policy data; Xu et al. 2024, "Is DPO superior to PPO")."""
    texts = [p.prompt for p in prompts for _ in range(samples)]
    rollouts = sample(
        model, tokenizer, template, texts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed
    )
    pairs = []
    for i, p in enumerate(prompts):
        outs = [r.text for r in rollouts[i * samples : (i + 1) * samples] if r.stopped]
        right = [o for o in outs if p.reward(o) > 0]
        wrong = [o for o in outs if p.reward(o) == 0 and o.strip()]
        chosen = right[0] if right else (gold[i] if gold is not None else None)
        if chosen is None or not wrong:
            continue
        rejected = max(set(wrong), key=wrong.count)
        pairs.append(Pair(p.prompt, chosen, rejected, kind="on-policy"))
    return pairs


def prepare_policy(model: nn.Module, method: str, lora) -> None:
    """Make the policy trainable: a new LoRA adapter on the frozen base, or every weight."""
    if getattr(model, "peft", None) is not None and model.peft.active is not None:
        raise ConfigError(
            "the model already carries an active PEFT adapter, which would blur what the "
            "reference is; align a checkpoint with the adapter merged into its weights"
        )
    if method == "lora":
        add_adapter(model, PeftConfig(method="lora", lora=lora))
    else:
        model.requires_grad_(True)
