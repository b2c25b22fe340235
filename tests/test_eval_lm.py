"""Request types against brute force: log-likelihood vs a full forward per request, rolling
perplexity vs a token-by-token sum, lm-eval's tokenization split and window rule, batch-size and
padding-side invariance, and context overflow."""

import pytest
import torch

from lmforge.evaluation import lm
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe

TEXTS = [
    "Question: how many apples does Tom have? Answer: Tom has 5 apples and buys 3 more, so 8.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny day.",
] * 10


@pytest.fixture(scope="module")
def model_and_tok():
    tok = train_bpe(TEXTS, 300)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=320,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        mlp="swiglu",
        position="rope",
        norm="rmsnorm",
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # sharper distributions, so greedy flags vary
    return model, tok


PAIRS = [
    ("Question: how many apples?\nAnswer:", " 8"),
    ("The quick brown", " fox jumps"),
    ("Tom has 5 apples ", "and buys 3 more"),  # trailing space moves into the continuation
    ("", "The quick brown fox"),  # empty context: BOS stands in
    ("the lazy dog near the river bank", " on a sunny day."),
    ("Answer: Tom", " has"),
    ("fox", " jumps over the lazy dog near the river"),
]


def brute_force(model, ctx, cont):
    ids = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = model(ids).float().log_softmax(-1)[0]
    total, greedy = 0.0, True
    for j, token in enumerate(cont):
        row = logp[len(ctx) - 1 + j]
        total += row[token].item()
        greedy &= int(row.argmax()) == token
    return total, greedy


def test_encode_pair_splits_like_lm_eval(model_and_tok):
    _, tok = model_and_tok
    ctx, cont = lm.encode_pair(tok, "Tom has 5 apples ", "and buys")
    assert ctx == tok.encode("Tom has 5 apples")
    assert ctx + cont == tok.encode("Tom has 5 apples and buys")
    ctx, cont = lm.encode_pair(tok, "", "The fox")
    assert ctx == [tok.bos_id] and cont == tok.encode("The fox")


def test_loglikelihood_matches_full_forward(model_and_tok):
    model, tok = model_and_tok
    results = lm.loglikelihood(model, tok, PAIRS, batch_size=3)
    for (c, x), r in zip(PAIRS, results):
        ctx, cont = lm.encode_pair(tok, c, x)
        expected, greedy = brute_force(model, ctx, cont)
        assert r.logprob == pytest.approx(expected, abs=1e-4)
        assert r.is_greedy == greedy and r.n_tokens == len(cont)
    assert any(r.is_greedy for r in results) or all(not r.is_greedy for r in results)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_size_and_padding_side_do_not_change_scores(model_and_tok, padding_side):
    model, tok = model_and_tok
    reference = lm.loglikelihood(model, tok, PAIRS, batch_size=1)
    for bs in (1, 3, 16):
        out = lm.loglikelihood(model, tok, PAIRS, batch_size=bs, padding_side=padding_side)
        for a, b in zip(reference, out):
            assert abs(a.logprob - b.logprob) < 1e-5 and a.is_greedy == b.is_greedy


def lm_eval_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm-eval 0.4 utils.get_rolling_token_windows + make_disjoint_window, written out."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    out = [([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        out.append(
            (
                token_list[window_end - max_seq_len - 1 : window_end - 1],
                token_list[window_end - window_pred_len : window_end],
            )
        )
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in out]


def test_rolling_windows_are_lm_eval_windows():
    tokens = list(range(1, 48))
    assert lm.rolling_windows(tokens, 0, 16, 16) == lm_eval_windows(tokens, 0, 16, 1)
    assert lm.rolling_windows(tokens, 0, 16, 6) == lm_eval_windows(tokens, 0, 16, 11)
    covered = [t for _, cont in lm.rolling_windows(tokens, 0, 16, 6) for t in cont]
    assert covered == tokens


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (64, 64)])
def test_rolling_loglikelihood_matches_token_by_token_sum(model_and_tok, window, stride):
    model, tok = model_and_tok
    text = TEXTS[0]
    tokens = lm.encode(tok, text)
    assert 16 < len(tokens) < 64  # several windows of 16; a single one of 64
    seq = [tok.bos_id] + tokens
    # Token i sits at seq[i + 1]; its window ends at `end` (the first window at min(window, n),
    # then every `stride`) and sees seq[max(0, end - window) : i + 1], one forward per token.
    expected, ends, end = 0.0, [], min(window, len(tokens))
    ends.append(end)
    while end < len(tokens):
        end = min(end + stride, len(tokens))
        ends.append(end)
    with torch.no_grad():
        for i, token in enumerate(tokens):
            end = next(e for e in ends if e > i)
            ctx = seq[max(0, end - window) : i + 1]
            expected += model(torch.tensor([ctx]))[0, -1].float().log_softmax(-1)[token].item()
    for bs in (1, 3):
        (r,) = lm.loglikelihood_rolling(
            model, tok, [text], window=window, stride=stride, batch_size=bs
        )
        assert r.logprob == pytest.approx(expected, abs=1e-4)
        assert r.n_tokens == len(tokens) and r.n_bytes == len(text.encode())


def test_context_longer_than_window_truncates_or_fails(model_and_tok):
    model, tok = model_and_tok
    long_context = " ".join(TEXTS[:6])
    overflow = lm.Overflow("truncate")
    (r,) = lm.loglikelihood(
        model, tok, [(long_context, " dog")], overflow=overflow, tags=["task t: item 3"]
    )
    ctx, cont = lm.encode_pair(tok, long_context, " dog")
    kept = (ctx + cont)[-65:]  # lm-eval keeps the last max_length + 1 tokens
    expected, _ = brute_force(model, kept[: len(kept) - len(cont)], cont)
    assert r.logprob == pytest.approx(expected, abs=1e-4) and r.truncated > 0
    assert len(overflow.warnings) == 1 and overflow.warnings[0].startswith("task t: item 3:")
    with pytest.raises(lm.ContextTooLong, match="task t: item 3: .*over the model's window of 64"):
        lm.loglikelihood(
            model,
            tok,
            [(long_context, " dog")],
            overflow=lm.Overflow("error"),
            tags=["task t: item 3"],
        )


def test_generate_until_cuts_at_stop_strings_and_ignores_batch_size(model_and_tok):
    model, tok = model_and_tok
    prompts = ["The quick", "Question: how many", "Tom has 5 apples and"]
    free = lm.generate_until(model, tok, prompts, max_gen_toks=12, batch_size=3)
    for bs in (1, 2):
        assert lm.generate_until(model, tok, prompts, max_gen_toks=12, batch_size=bs) == free
    stop = free[0][3:6]
    cut = lm.generate_until(model, tok, prompts[:1], until=[stop], max_gen_toks=12)
    assert cut[0] == free[0][: free[0].find(stop)]
