"""Task heads against transformers' BertForSequenceClassification / BertForTokenClassification /
BertForQuestionAnswering (fp32, random weights, 1e-4), SQuAD scoring, freezing (bit-identical frozen weights, optimizer state only for
trained ones, gradual unfreezing, layer-wise rates), data errors, and `lmforge finetune` on the
rule-generated sets with a tiny model."""

import json
import warnings

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from lmforge.adapt import finetune as ft
from lmforge.cli import main
from lmforge.errors import ConfigError, CorpusError
from lmforge.interop.hf import load_hf
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_model

BERT_SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
)


def randomize(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def bert_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (2, 12), generator=g)
    types = torch.tensor([[0] * 6 + [1] * 6, [0] * 4 + [1] * 8])
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    return {"input_ids": x, "token_type_ids": types, "attention_mask": mask}


def ours_and_ref(tmp_path, cls, **kwargs):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**BERT_SIZES, **kwargs, attn_implementation="eager")
    ref = randomize(getattr(transformers, cls)(config))
    ref.bert.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bare BertModel: the MLM head is newly initialized
        return load_hf(tmp_path), ref


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_sequence_head_matches_bert_for_sequence_classification(task, tmp_path):
    n = 1 if task == "regression" else 3
    ours, ref = ours_and_ref(tmp_path, "BertForSequenceClassification", num_labels=n)
    head = ft.make_head(ours, task, n, "cls")
    assert head.pooler is ours.nsp_head.pooler  # BERT's pre-trained pooler, reused
    head.classifier.load_state_dict(ref.classifier.state_dict())
    net = ft.TaskModel(ours, head).eval()
    batch = bert_batch()
    with torch.no_grad():
        want = ref(**batch).logits
        torch.testing.assert_close(net(batch), want, atol=1e-4, rtol=1e-4)


def test_token_head_matches_bert_for_token_classification(tmp_path):
    ours, ref = ours_and_ref(tmp_path, "BertForTokenClassification", num_labels=5)
    head = ft.make_head(ours, "tagging", 5, "cls")
    head.classifier.load_state_dict(ref.classifier.state_dict())
    net = ft.TaskModel(ours, head).eval()
    batch = bert_batch()
    with torch.no_grad():
        got, want = net(batch), ref(**batch).logits
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1, :9], want[1, :9], atol=1e-4, rtol=1e-4)


def test_pooling_reads_the_real_tokens():
    h = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert ft.pool(h, mask, "cls").flatten().tolist() == [0.0, 3.0]
    assert ft.pool(h, mask, "mean").flatten().tolist() == [1.0, 3.5]
    assert ft.pool(h, mask, "last").flatten().tolist() == [2.0, 4.0]


# ---- freezing --------------------------------------------------------------------------------
def tiny(arch: str = "encoder", vocab: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(arch=arch, vocab_size=vocab, d_model=32, n_layers=3, n_heads=2, max_seq_len=32)
    )


def random_rows(n: int = 32):
    g = torch.Generator().manual_seed(0)
    return [
        {"ids": torch.randint(1, 64, (8,), generator=g).tolist(), "types": [0] * 8, "y": i % 2}
        for i in range(n)
    ]


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def trained(freeze: ft.FreezeConfig, steps: int = 4):
    model = tiny()
    net = ft.TaskModel(model, ft.make_head(model, "classification", 2, "mean"))
    before = snapshot(net)
    opt = ft.train_task(
        net, random_rows(), "classification", freeze, steps=steps, batch_size=8, lr=1e-2, pad_id=0
    )
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    return net, opt, moved


def test_frozen_layers_stay_bit_identical_and_have_no_optimizer_state():
    net, opt, moved = trained(ft.FreezeConfig(freeze_layers=2))
    frozen = [
        n
        for n, _ in net.named_parameters()
        if n.startswith(("backbone.embed.", "backbone.blocks.0.", "backbone.blocks.1."))
    ]
    assert frozen and not moved & set(frozen)
    assert {
        n for n in moved if n.startswith("backbone.blocks.2.")
    } and "head.classifier.weight" in moved
    # State for exactly the weights that trained (the unused MLM head gets no gradient either)
    assert {id(p) for p in opt.state} == {id(p) for n, p in net.named_parameters() if n in moved}


def test_gradual_unfreezing_releases_one_block_every_n_steps():
    model = tiny()
    unfreezer = ft.Unfreezer(ft.layer_groups(model), floor=1, every=2)
    # groups: 0 embeddings, 1..3 blocks, 4 the layers above; the floor keeps embeddings frozen
    assert [unfreezer.lowest_trainable(s) for s in range(8)] == [4, 4, 3, 3, 2, 2, 1, 1]
    _, opt, moved = trained(ft.FreezeConfig(unfreeze_every=2), steps=4)
    assert any(n.startswith("backbone.blocks.2.") for n in moved)
    assert not any(
        n.startswith(("backbone.blocks.1.", "backbone.blocks.0.", "backbone.embed.")) for n in moved
    )


def test_discriminative_learning_rates_decay_down_the_stack():
    groups = ft.layer_groups(tiny())
    lrs = [g["lr"] for g in ft.param_groups(groups, floor=2, lr=1.0, decay=0.5)]
    assert lrs == [0.25, 0.5, 1.0]  # blocks 1, 2 and the top; embeddings and block 0 frozen


def test_freeze_depth_beyond_the_model_is_an_error():
    with pytest.raises(ConfigError, match=r"freeze_layers=4: the model has only 3 blocks"):
        trained(ft.FreezeConfig(freeze_layers=4))


# ---- data and metrics ------------------------------------------------------------------------
def test_bad_items_are_named(tmp_path):
    tags = tmp_path / "tags.jsonl"
    tags.write_text(
        '{"tokens": "a b", "tags": "O O"}\n{"tokens": ["a", "b", "c"], "tags": ["O"]}\n'
    )
    with pytest.raises(CorpusError, match=r"tags.jsonl:2: 3 tokens but 1 tags"):
        ft.read_items(tags, "tagging")
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\ngood,pos\nbad,\n")
    with pytest.raises(CorpusError, match=r"texts.csv:3: missing label"):
        ft.read_items(texts, "classification")
    item = ft.Item("meh", label="neutral", where="test.csv:7")
    with pytest.raises(CorpusError, match=r"test.csv:7: label 'neutral' is not in the label map"):
        ft.encode_item(item, word_tokenizer(), "classification", {"pos": 0, "neg": 1}, 16)


def test_span_f1_counts_exact_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert ft.span_f1(gold, gold) == 1.0
    # PER span cut short (wrong), LOC right: precision 1/2, recall 1/2
    assert ft.span_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)
    assert ft.bio_spans(["I-LOC", "I-LOC", "B-LOC"]) == {("LOC", 0, 2), ("LOC", 2, 3)}


# ---- the command on the rule-generated sets ---------------------------------------------------
def word_tokenizer(extra: list[str] = ()) -> Tokenizer:
    words = ft.POSITIVE + ft.NEGATIVE + ft.FIRST + ft.LAST + ft.CITIES + ft.FILLER + list(extra)
    words += [w for s in ft.SUBJECTS for w in s.split()] + [
        "was",
        "really",
        "i",
        "think",
        "overall",
        "again",
    ]
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *dict.fromkeys(words)])
    }
    backend = Backend(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return Tokenizer(backend, pad_token="[PAD]")


@pytest.mark.parametrize(
    "task, arch, pooling, key, target",
    [
        ("classification", "encoder", "cls", "accuracy", 0.95),
        ("tagging", "encoder", "cls", "span_f1", 0.9),
        ("classification", "causal", "last", "accuracy", 0.95),
    ],
)
def test_finetune_command_learns_the_toy_task(task, arch, pooling, key, target, tmp_path):
    save_model(tiny(arch, vocab=96), tmp_path / "base", tokenizer=word_tokenizer())
    out = tmp_path / "out"
    args = [
        f"--model={tmp_path / 'base'}",
        f"--task={task}",
        f"--out={out}",
        f"--pooling={pooling}",
    ]
    args += ["--steps=60", "--lr=3e-3", "--toy_items=300", "--freeze.freeze_embeddings=false"]
    assert main(["finetune", *args]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["after"][key] >= target > result["before"][key]
    labels = json.loads((out / "labels.json").read_text())
    assert labels == (
        ["negative", "positive"] if task == "classification" else ["B-LOC", "B-PER", "I-PER", "O"]
    )
    net, saved_labels = ft.load_task_model(out)
    rows = [
        ft.encode_item(it, word_tokenizer(), task, {t: i for i, t in enumerate(labels)}, 32)
        for it in ft.toy_items(task, 300)[240:]
    ]
    metrics = ft.evaluate(net, rows, task, saved_labels, pad_id=0)
    assert metrics[key] == pytest.approx(result["after"][key])  # the saved model scores the same


# ---- extractive QA ----------------------------------------------------------------------------
def test_span_head_matches_bert_for_question_answering(tmp_path):
    ours, ref = ours_and_ref(tmp_path, "BertForQuestionAnswering")
    head = ft.make_head(ours, "qa", 0, "cls")
    head.qa_outputs.load_state_dict(ref.qa_outputs.state_dict())
    net = ft.TaskModel(ours, head).eval()
    batch = bert_batch()
    with torch.no_grad():
        got, out = net(batch), ref(**batch)
        torch.testing.assert_close(got[0, :, 0], out.start_logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[0, :, 1], out.end_logits[0], atol=1e-4, rtol=1e-4)


def test_squad_normalisation_and_f1():
    assert ft.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert ft.squad_f1("the eiffel tower", "Eiffel Tower") == 1.0
    # 2 common tokens, precision 2/3, recall 2/2: F1 = 2 * (2/3) / (2/3 + 1) = 0.8
    assert ft.squad_f1("big eiffel tower", "eiffel tower") == pytest.approx(0.8)
    assert ft.squad_f1("paris", "lyon") == 0.0
    start, end = torch.tensor([0.0, 5.0, 1.0, 9.0]), torch.tensor([0.0, 1.0, 8.0, 2.0])
    context = torch.tensor([False, True, True, True])
    # (3, 2) would score 9 + 8 but ends before it starts; (1, 2) scores 5 + 8 = 13
    assert ft.best_span(start, end, context) == (1, 2)
    assert ft.best_span(start, end, context, longest=1) == (3, 3)  # one token: 9 + 2


def test_qa_items_name_an_answer_outside_the_context(tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text(
        json.dumps({"context": "anna lives in oslo .", "question": "where ?", "answer": "oslo"})
        + "\n"
        + json.dumps({"context": "anna lives in oslo .", "question": "where ?", "answer": "lima"})
        + "\n"
    )
    with pytest.raises(CorpusError, match=r"qa.jsonl:2: answer 'lima' is not inside its context"):
        ft.read_items(bad, "qa")
    bad.write_text(
        json.dumps({"context": "oslo", "question": "q", "answer": "oslo", "answer_start": 2}) + "\n"
    )
    with pytest.raises(CorpusError, match="at answer_start 2"):
        ft.read_items(bad, "qa")


def test_finetune_command_learns_toy_extractive_qa(tmp_path):
    tok = word_tokenizer(
        ft.JOBS
        + ["lives", "in", "works", "as", "a", "likes", "where", "does", "live"]
        + ["what", "is", "'", "s", "job", "?", "."]
    )
    item = ft.toy_items("qa", 1)[0]
    row = ft.encode_item(item, tok, "qa", {}, 64)
    a, b = row["y"]
    assert tok.decode(row["ids"][a : b + 1]).strip() == item.label  # the target span is exact
    save_model(tiny("encoder", vocab=128), tmp_path / "base", tokenizer=tok)
    out = tmp_path / "out"
    args = [f"--model={tmp_path / 'base'}", "--task=qa", f"--out={out}", "--steps=150"]
    args += ["--lr=3e-3", "--toy_items=300", "--batch_size=32"]
    assert main(["finetune", *args]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["after"]["exact_match"] >= 0.9 > result["before"]["exact_match"]


def test_finetune_regression_on_the_toy_set_and_on_a_hugging_face_bert(tmp_path):
    """Regression on the rule-generated scores; and the command on a Hugging Face BERT directory
    (config.json + safetensors, as transformers saves it)."""
    transformers = pytest.importorskip("transformers")
    tok = word_tokenizer(["very"])
    save_model(tiny("encoder", vocab=96), tmp_path / "base", tokenizer=tok)
    args = [f"--model={tmp_path / 'base'}", "--task=regression", f"--out={tmp_path / 'reg'}"]
    assert main(["finetune", *args, "--steps=200", "--lr=3e-3", "--toy_items=300"]) == 0
    result = json.loads((tmp_path / "reg" / "metrics.json").read_text())
    # The scores span -3..3 (variance ~4.7): a tenth of it left means the intensity was learned.
    assert result["after"]["mse"] < 0.5 < result["before"]["mse"]

    config = transformers.BertConfig(**{**BERT_SIZES, "vocab_size": tok.vocab_size})
    randomize(transformers.BertModel(config)).save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    args = [f"--model={tmp_path / 'hf'}", "--task=classification", f"--out={tmp_path / 'cls'}"]
    assert main(["finetune", *args, "--steps=40", "--lr=1e-3", "--toy_items=200"]) == 0
    result = json.loads((tmp_path / "cls" / "metrics.json").read_text())
    assert result["after"]["accuracy"] >= 0.9
