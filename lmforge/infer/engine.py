"""The generation engine: continuous batching over a preallocated slot KV cache, prompt-prefix
caching, per-request sampling and streaming. Evaluation, rollouts, the chat REPL and the server
all go through `Engine`; `generate()` and `stream()` in generate.py are one-call wrappers."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.infer.fast_decode import fast_decoder
from lmforge.infer.hugepages import move_to_huge_pages
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, sample_next
from lmforge.infer.sequence import Generation, SequenceState, TextDecoder, partial_stop_string
from lmforge.model.attention import SlotKVCache


@dataclass
class EngineStats:
    """Counters since the engine was built (the server exports them; tests read them)."""

    prefill_tokens: int = 0  # prompt tokens run through the model
    prefix_tokens_reused: int = 0  # prompt tokens whose keys/values came from the prefix cache
    decode_steps: int = 0  # batched forward passes of one token per active request
    generated_tokens: int = 0
    peak_active: int = 0  # most requests decoded together in one step (batching at work)
    cancelled: int = 0  # requests dropped by `cancel` before they finished


class Request:
    """One submitted prompt: its sampling state, its text so far and, once done, `generation`."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        seq: SequenceState,
        on_text: Callable[[str], None] | None,
        device: torch.device,
    ) -> None:
        self.prompt, self.params, self.seq, self.on_text = prompt, params, seq, on_text
        # A generator per request makes a seeded request's samples independent of its batch.
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device).manual_seed(params.seed)
        self.seen: torch.Tensor | None = None  # (1, vocab) tokens seen, for the penalty
        self.next_token = -1  # the last sampled token, fed to the next decode step
        self._sent = 0  # characters (or tokens, without a tokenizer) handed out so far
        self._done = threading.Event()
        self.cancelled = False  # set by Engine.cancel; the request leaves at the next step

    @property
    def finished(self) -> bool:
        return self.seq.finish_reason is not None

    @property
    def generation(self) -> Generation:
        """The result; only meaningful once `finished`."""
        text = self.seq.text if self.seq.detokenizer is not None else None
        return Generation(list(self.seq.tokens), text, self.seq.finish_reason)

    def wait(self, timeout: float | None = None) -> Generation:
        """Block until another thread's `Engine.step`/`run` finished this request."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        return self.generation

    def new_output(self) -> list[str | int]:
        """Text pieces (token ids without a tokenizer) that became final since the last call.
        Text that may be the start of a stop string or of a split character is held back."""
        seq = self.seq
        if seq.detokenizer is None:
            out: list[str | int] = list(seq.tokens[self._sent :])
            self._sent = len(seq.tokens)
            return out
        end = len(seq.text)
        if seq.finish_reason is None:
            end -= partial_stop_string(seq.text, self.params.stop_strings)
        if end <= self._sent:
            return []
        piece, self._sent = seq.text[self._sent : end], end
        return [piece]


class Engine:
    """Continuous batching: requests join free slots between decode steps and leave when done.

    Memory: the KV cache is allocated once for max_batch x max_context positions
    (2 * n_layers * max_batch * max_context * kv_heads * head_dim elements) plus the prefix
    cache's prefix_cache_tokens positions; neither grows. `submit` is thread-safe; `step`, `run`,
    `generate` and `stream` may be called from any thread (one step runs at a time).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextDecoder | None = None,
        *,
        max_batch: int = 8,
        max_context: int | None = None,
        prefix_cache_tokens: int = 4096,
        prefix_block: int = 16,
        eos_id: int | None = None,
    ) -> None:
        limit = model.config.max_seq_len
        max_context = max_context or limit
        if max_batch < 1 or not 1 <= max_context <= limit:
            raise ValueError(
                f"need max_batch >= 1 and 1 <= max_context <= the model's max_seq_len {limit}, "
                f"got max_batch={max_batch}, max_context={max_context}"
            )
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        if eos_id is None and tokenizer is not None:
            eos_id = tokenizer.eos_id
        self.eos_id = eos_id
        if next(model.parameters(), torch.empty(0)).device.type == "cpu":
            move_to_huge_pages(model)  # ~8% faster decoding: weights stream with fewer TLB misses
        # A model without parameters (a test double) gets an fp32 cache on the CPU.
        weight = next(model.parameters(), torch.empty(0))
        self.device = weight.device
        self.cache = SlotKVCache(
            model.config, max_batch, max_context, dtype=weight.dtype, device=weight.device
        )
        self.prefix_cache = PrefixCache(self.cache, prefix_cache_tokens, prefix_block)
        # Decode steps of plain decoders run in C++ (after the huge-page move: it reads the
        # model's tensors as they are now); None: the model's own forward.
        self.fast = fast_decoder(model) if self.device.type == "cpu" else None
        self.stats = EngineStats()
        self._queue: deque[Request] = deque()
        self._queue_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._active: list[Request] = []  # slot i holds _active[i]; slots stay contiguous
        self._cancel_pending = False

    @property
    def max_context(self) -> int:
        return self.cache.max_len

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Request:
        """Queue a prompt (token ids); it joins the batch at the next step with a free slot.
        on_text is called (from the stepping thread) with each new piece of final text."""
        request = self._new_request(prompt, params, on_text)
        with self._queue_lock:
            self._queue.append(request)
        return request

    def step(self) -> list[Request]:
        """Admit waiting requests into free slots (prefill), then advance every active request
        by one token in one forward pass; return the requests that finished."""
        with self._step_lock, torch.inference_mode():
            finished = self._drop_cancelled() if self._cancel_pending else []
            finished += self._admit()
            if self._active:
                self.stats.peak_active = max(self.stats.peak_active, len(self._active))
                finished += self._decode()
        for request in finished:
            request._done.set()
        return finished

    def cancel(self, request: Request) -> None:
        """Stop a request early (e.g. its client went away): at the next step it leaves the queue
        or frees its slot, with finish_reason "cancelled". Thread-safe; finished ones are kept."""
        if not request.finished:
            request.cancelled = True
            self._cancel_pending = True

    def has_work(self) -> bool:
        with self._queue_lock:
            return bool(self._queue or self._active)

    def run(self) -> None:
        """Step until no request is waiting or active."""
        while self.has_work():
            self.step()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]:
        """Continue each prompt; one SamplingParams for all, or one per prompt. With one seeded
        SamplingParams, prompt i samples with seed + i, so equal prompts differ yet each is
        reproducible."""
        if isinstance(params, SamplingParams):
            params = [
                dataclasses.replace(params, seed=params.seed + i)
                if params.seed is not None
                else params
                for i in range(len(prompts))
            ]
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        # Check every prompt before queueing any, so a bad one leaves the engine untouched.
        requests = [self._new_request(p, q, None) for p, q in zip(prompts, params)]
        with self._queue_lock:
            self._queue.extend(requests)
        while not all(r.finished for r in requests):
            self.step()
        return [r.generation for r in requests]

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[str | int]:
        """Continue one prompt, yielding text pieces as they become final (token ids when the
        engine has no tokenizer); other requests in the engine advance with it."""
        request = self.submit(prompt, params)
        while True:
            if not request.finished:
                self.step()
            yield from request.new_output()
            if request.finished:
                return

    def _new_request(
        self, prompt: Sequence[int], params: SamplingParams, on_text: Callable[[str], None] | None
    ) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt]
        vocab, limit = self.model.config.vocab_size, self.max_context
        if not prompt:
            raise ValueError(
                "cannot generate from an empty prompt (give at least one token, e.g. BOS)"
            )
        if len(prompt) > limit:
            model_limit = self.model.config.max_seq_len
            where = f"the model's max_seq_len {model_limit}"
            if limit < model_limit:
                where = f"the engine's max_context {limit} ({where})"
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds {where}")
        if bad := [t for t in prompt if not 0 <= t < vocab]:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if self.tokenizer is None and (params.stop_strings or on_text is not None):
            what = "SamplingParams.stop_strings need" if params.stop_strings else "on_text needs"
            raise ValueError(f"{what} a tokenizer to decode the output (Engine(tokenizer=...))")
        # The last new token is never fed back, so a prompt of n tokens leaves room for limit-n+1.
        max_new = min(params.max_new_tokens, limit - len(prompt) + 1)
        stop_ids = set(params.stop_token_ids) | (
            {self.eos_id} if self.eos_id is not None else set()
        )
        seq = SequenceState(prompt, max_new, stop_ids, params.stop_strings, self.tokenizer)
        request = Request(prompt, params, seq, on_text, self.device)
        if params.repetition_penalty != 1.0:
            request.seen = torch.zeros(1, vocab, dtype=torch.bool, device=self.device)
            request.seen[0, prompt] = True
        return request

    def _drop_cancelled(self) -> list[Request]:
        # Cleared before the scan, so a cancel that lands during it is seen at the next step.
        self._cancel_pending = False
        with self._queue_lock:
            dropped = [r for r in self._queue if r.cancelled]
            self._queue = deque(r for r in self._queue if not r.cancelled)
        for slot in reversed(range(len(self._active))):  # high slots first, as in _decode
            if self._active[slot].cancelled:
                dropped.append(self._active[slot])
                self._release(slot)
        for request in dropped:
            request.seq.finish_reason = "cancelled"
        self.stats.cancelled += len(dropped)
        return dropped

    def _admit(self) -> list[Request]:
        """Prefill waiting requests into free slots; sample each one's first token."""
        finished = []
        while len(self._active) < self.max_batch:
            with self._queue_lock:
                if not self._queue:
                    break
                request = self._queue.popleft()
            slot = len(self._active)
            self._active.append(request)
            prompt = request.prompt
            # The last prompt token is always computed: its logits choose the first new token.
            reused = self.prefix_cache.load(prompt[:-1], self.cache, slot)
            self.cache.lengths[slot] = reused
            ids = torch.tensor([prompt[reused:]], device=self.device)
            logits = self.model(ids, cache=self.cache.batch(slot, slot + 1), logits_to_keep=1)
            self.prefix_cache.store(prompt, self.cache, slot)
            self.stats.prefill_tokens += len(prompt) - reused
            self.stats.prefix_tokens_reused += reused
            if self._push(request, self._sample(logits[:, -1], [request])[0]):
                self._release(slot)
                finished.append(request)
        return finished

    def _decode(self) -> list[Request]:
        """One token for every active request, in one forward pass over slots [0, n)."""
        active = self._active
        batch = self.cache.batch(0, len(active))
        if self.fast is not None and self.fast.current():
            tokens = torch.tensor([r.next_token for r in active])
            logits = self.fast.step(tokens, batch)
        else:
            tokens = torch.tensor([[r.next_token] for r in active], device=self.device)
            logits = self.model(tokens, cache=batch, logits_to_keep=1)[:, -1]
        self.stats.decode_steps += 1
        done = [s for s, t in enumerate(self._sample(logits, active)) if self._push(active[s], t)]
        finished = [active[s] for s in done]
        for slot in reversed(done):  # high slots first, so each move takes a live request
            self._release(slot)
        return finished

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """One token per row of (B, vocab) logits, each with its request's params and RNG."""
        if all(r.params.temperature == 0 and r.seen is None for r in requests):
            return logits.argmax(dim=-1).tolist()
        tokens = []
        for row, r in enumerate(requests):
            x = logits[row : row + 1]
            if r.seen is not None:
                x = apply_repetition_penalty(x, r.seen, r.params.repetition_penalty)
            tokens.append(sample_next(x, r.params, r.generator))
        return torch.cat(tokens).tolist()  # the step's one host sync

    def _push(self, request: Request, token: int) -> bool:
        """Record a sampled token; return True once the request is finished."""
        self.stats.generated_tokens += 1
        request.next_token = token
        if request.seen is not None:
            request.seen[0, token] = True
        done = request.seq.push(token)
        if request.on_text is not None:
            for piece in request.new_output():
                request.on_text(piece)
        return done

    def _release(self, slot: int) -> None:
        """Free `slot`; the last active slot moves into it so that active slots stay [0, n)."""
        last = len(self._active) - 1
        if slot != last:
            self.cache.move(last, slot)
            self._active[slot] = self._active[last]
        self._active.pop()
        self.cache.lengths[last] = 0
