"""`lmforge finetune`: classic fine-tuning (seed 001, 微调): a small task head on a pre-trained
model, the embeddings and lower blocks frozen, the head and top blocks trained. Sequence
classification, regression and token classification (BIO tags, span-level F1) on any lmforge
model, encoder (BERT, Devlin et al. 2019) or decoder; extractive span QA (start/end logits,
SQuAD exact match and F1, Rajpurkar et al. 2016); ULMFiT's gradual unfreezing and
discriminative learning rates (Howard & Ruder 2018)."""

from __future__ import annotations

import csv
import json
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import field_, save_yaml, to_dict
from lmforge.errors import ConfigError, CorpusError

Task = Literal["classification", "regression", "tagging", "qa"]
Pooling = Literal["cls", "mean", "last"]
IGNORE = -100  # labels of positions without a target (padding, later word pieces)


# ---- heads -----------------------------------------------------------------------------------
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per sequence (B, d) from hidden states (B, T, d) of right-padded rows: the
    first ([CLS]) token, the mean over real tokens, or the last real token (a decoder's summary:
    only it has seen the whole text)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = attention_mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    last = attention_mask.long().sum(-1).clamp(min=1) - 1
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


class SequenceHead(nn.Module):
    """Pooled hidden state -> n_labels logits (n_labels=1: a regression value). With [CLS]
    pooling and a pooler (BERT's dense + tanh, pre-trained with NSP) the vector goes through it
    first, as in BertForSequenceClassification (Devlin et al. 2019, Sec. 4.1)."""

    def __init__(
        self,
        d_model: int,
        n_labels: int,
        pooling: Pooling = "cls",
        pooler: nn.Module | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pooling, self.pooler = pooling, pooler
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = pool(hidden, attention_mask, self.pooling)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.classifier(self.drop(x))


class TokenHead(nn.Module):
    """Per-token logits (B, T, n_labels) for sequence labelling (BertForTokenClassification)."""

    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(hidden))


class SpanHead(nn.Module):
    """Start and end logits (B, T, 2) of an answer span in the context (BertForQuestionAnswering:
    one linear layer over each token, Devlin et al. 2019, Sec. 4.2)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.qa_outputs = nn.Linear(d_model, 2)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.qa_outputs(hidden)


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, T, d) of any lmforge model: an encoder's (no MLM transform), or
    a decoder's output-layer input (the vocabulary projection is skipped)."""
    arch = model.config.arch
    if arch == "encoder":
        return model.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if arch == "encoder_decoder":
        return model.encode(batch["input_ids"], batch["attention_mask"])
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], hidden_only=True)


class TaskModel(nn.Module):
    """A pre-trained model (`backbone`) with a task head on its final hidden states."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(hidden_states(self.backbone, batch), batch["attention_mask"])


def make_head(model: nn.Module, task: Task, n_labels: int, pooling: Pooling) -> nn.Module:
    d = model.config.d_model
    if task == "tagging":
        return TokenHead(d, n_labels)
    if task == "qa":
        return SpanHead(d)
    # A BERT checkpoint with a pooler loads it as nsp_head.pooler; reuse it for [CLS] pooling.
    pooler = model.nsp_head.pooler if pooling == "cls" and hasattr(model, "nsp_head") else None
    return SequenceHead(d, 1 if task == "regression" else n_labels, pooling, pooler)


# ---- freezing --------------------------------------------------------------------------------
EMBEDDINGS = ("embed.", "pos_embed.", "type_embed.", "embed_norm.")


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters bottom to top: [embeddings, block 0, ..., block L-1, everything above] (an
    encoder-decoder's encoder blocks come before its decoder blocks). Tied weights count once,
    with the embeddings."""
    blocks = [*getattr(model, "encoder_blocks", []), *model.blocks]
    index = {id(p): i + 1 for i, b in enumerate(blocks) for p in b.parameters()}
    groups: list[list[nn.Parameter]] = [[] for _ in range(len(blocks) + 2)]
    for name, p in model.named_parameters():
        if name.startswith(EMBEDDINGS):
            groups[0].append(p)
        else:
            groups[index.get(id(p), len(blocks) + 1)].append(p)
    return groups


def check_freeze_depth(model: nn.Module, freeze_layers: int) -> None:
    n = len(layer_groups(model)) - 2
    if not 0 <= freeze_layers <= n:
        raise ConfigError(f"freeze_layers={freeze_layers}: the model has only {n} blocks (0..{n})")


class Unfreezer:
    """Which layer groups train at a step. Groups below the floor (the embeddings if
    freeze_embeddings, plus the bottom freeze_layers blocks) never train. With `every` > 0 the
    rest unfreeze top-down, ULMFiT's gradual unfreezing (Howard & Ruder 2018, Sec. 3.3): first
    the head and the layers above the blocks, then one more block every `every` steps."""

    def __init__(self, groups: list[list[nn.Parameter]], floor: int, every: int = 0) -> None:
        self.groups, self.floor, self.every = groups, floor, every

    def lowest_trainable(self, step: int) -> int:
        top = len(self.groups) - 1
        if not self.every:
            return self.floor
        return max(self.floor, top - step // self.every)

    def apply(self, step: int) -> None:
        low = self.lowest_trainable(step)
        for i, group in enumerate(self.groups):
            for p in group:
                p.requires_grad_(i >= low)


def param_groups(
    groups: list[list[nn.Parameter]], floor: int, lr: float, decay: float
) -> list[dict]:
    """Optimizer groups for the layers that ever train: discriminative learning rates (Howard &
    Ruder 2018, Sec. 3.2), lr * decay^depth counted down from the top (decay 1: one rate). Frozen
    layers are left out, so the optimizer holds no state for them."""
    top = len(groups) - 1
    return [
        {"params": g, "lr": lr * decay ** (top - i), "base_lr": lr * decay ** (top - i)}
        for i, g in enumerate(groups)
        if i >= floor and g
    ]


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Item:
    """One example: text (+ text_pair) and a label, or words and their tags. `where` names it
    (file:line) in error messages."""

    text: str = ""
    text_pair: str | None = None
    label: str | float | None = None
    tokens: list[str] | None = None
    tags: list[str] | None = None
    where: str = ""
    answer_start: int | None = None  # qa: character offset of the answer (label) in text_pair


def read_items(path: str | Path, task: Task) -> list[Item]:
    """Items of a CSV (header: text[,text_pair],label or tokens,tags as space-separated strings,
    or context,question,answer[,answer_start]) or JSONL file (the same fields; tokens and tags
    may be lists)."""
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(f))]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [(f"{path}:{i + 1}", json.loads(line)) for i, line in enumerate(lines) if line]
    return [_item(row, where, task) for where, row in rows]


def _item(row: dict, where: str, task: Task) -> Item:
    if task == "qa":
        return _qa_item(row, where)
    need = ("tokens", "tags") if task == "tagging" else ("text", "label")
    missing = [k for k in need if row.get(k) in (None, "")]
    if missing:
        raise CorpusError(f"{where}: missing {', '.join(missing)} (a {task} item needs {need})")
    if task != "tagging":
        label = row["label"]
        if task == "regression":
            try:
                label = float(label)
            except ValueError:
                raise CorpusError(f"{where}: regression label {label!r} is not a number") from None
        return Item(row["text"], row.get("text_pair") or None, label, where=where)
    tokens, tags = row["tokens"], row["tags"]
    tokens = tokens.split() if isinstance(tokens, str) else list(tokens)
    tags = tags.split() if isinstance(tags, str) else list(tags)
    if len(tokens) != len(tags):
        raise CorpusError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
    return Item(tokens=tokens, tags=tags, where=where)


def _qa_item(row: dict, where: str) -> Item:
    """question (text), context (text_pair), answer (label) found in the context at
    answer_start, or at its first occurrence when no offset is given."""
    missing = [k for k in ("context", "question", "answer") if row.get(k) in (None, "")]
    if missing:
        raise CorpusError(f"{where}: missing {', '.join(missing)} (a qa item needs them)")
    context, answer = row["context"], row["answer"]
    start = row.get("answer_start")
    start = context.find(answer) if start in (None, "") else int(start)
    if start < 0 or context[start : start + len(answer)] != answer:
        raise CorpusError(
            f"{where}: answer {answer!r} is not inside its context"
            + ("" if row.get("answer_start") in (None, "") else f" at answer_start {start}")
        )
    return Item(row["question"], context, answer, where=where, answer_start=start)


def build_label_map(items: list[Item], task: Task) -> list[str]:
    """Sorted labels (or tags) of the training items; regression has none."""
    if task in ("regression", "qa"):
        return []
    found = (
        {t for it in items for t in it.tags} if task == "tagging" else {it.label for it in items}
    )
    return sorted(str(x) for x in found)


def label_id(labels: dict[str, int], label: str, item: Item) -> int:
    if label not in labels:
        raise CorpusError(f"{item.where}: label {label!r} is not in the label map {list(labels)}")
    return labels[label]


POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fun", "brilliant", "good"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "bad", "poor", "dull", "horrible"]
SUBJECTS = ["the film", "the book", "this meal", "the concert", "our trip", "that game", "the show"]
FIRST = ["anna", "omar", "li", "maria", "john", "priya", "kenji"]
LAST = ["smith", "garcia", "chen", "okafor", "rossi", "tanaka"]
CITIES = ["paris", "lagos", "tokyo", "lima", "oslo", "cairo", "denver"]
JOBS = ["baker", "nurse", "pilot", "teacher", "farmer", "painter"]
FILLER = ["today", "went", "to", "met", "in", "with", "and", "visited", "later", "from"]


def toy_items(task: Task, n: int, seed: int = 0) -> list[Item]:
    """A rule-generated set that runs offline. classification: the sentiment of one opinion
    word ("the film was great, really" -> positive); regression: that sign times one plus the
    number of "very" before the word ("the film was very very bad" -> -3.0); tagging: person
    names (first [last]) and cities among filler words, tagged B-PER/I-PER/B-LOC/O; qa: a
    three-sentence context and a question on where someone lives or what they do (a distractor
    sentence names another city)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        where = f"toy:{i}"
        if task == "classification":
            label = rng.choice(["positive", "negative"])
            word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
            tail = rng.choice(["", " really", " i think", " overall", " again"])
            text = f"{rng.choice(SUBJECTS)} was {word}{tail}"
            items.append(Item(text, label=label, where=where))
        elif task == "tagging":
            tokens, tags = [], []
            for _ in range(rng.randint(3, 8)):
                kind = rng.random()
                if kind < 0.25:
                    name = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
                    tokens += name
                    tags += ["B-PER"] + ["I-PER"] * (len(name) - 1)
                elif kind < 0.4:
                    tokens.append(rng.choice(CITIES))
                    tags.append("B-LOC")
                else:
                    tokens.append(rng.choice(FILLER))
                    tags.append("O")
            items.append(Item(tokens=tokens, tags=tags, where=where))
        elif task == "regression":
            # A score in [-3, 3]: the opinion's sign times how many intensifiers precede it.
            sign = rng.choice([1, -1])
            k = rng.randint(1, 3)
            word = rng.choice(POSITIVE if sign > 0 else NEGATIVE)
            text = f"{rng.choice(SUBJECTS)} was {'very ' * (k - 1)}{word}"
            items.append(Item(text, label=float(sign * k), where=where))
        elif task == "qa":
            name, city, job = rng.choice(FIRST), rng.choice(CITIES), rng.choice(JOBS)
            facts = [f"{name} lives in {city} .", f"{name} works as a {job} ."]
            rng.shuffle(facts)
            context = " ".join([f"{rng.choice(FIRST)} likes {rng.choice(CITIES)} .", *facts])
            question, answer = rng.choice(
                [(f"where does {name} live ?", city), (f"what is {name} 's job ?", job)]
            )
            fact = next(f for f in facts if f" {answer} " in f" {f} ")
            start = context.index(fact) + fact.index(answer)
            items.append(Item(question, context, answer, where=where, answer_start=start))
        else:
            raise ConfigError(f"no rule-generated set for task {task!r}: give data files")
    return items


# ---- encoding --------------------------------------------------------------------------------
def specials(tokenizer) -> tuple[list[int], list[int]]:
    """Ids opening a sequence and closing each segment: BERT's [CLS] and [SEP], else the BOS
    token (if the tokenizer adds one) and nothing."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        return [cls], [sep]
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []), []


def encode_item(item: Item, tokenizer, task: Task, labels: dict[str, int], max_len: int) -> dict:
    """input_ids, token_type_ids and targets of one item, cut to max_len. Tagging labels each
    word's first piece and ignores the rest (Devlin et al. 2019, Sec. 5.3)."""
    start, end = specials(tokenizer)
    if task == "tagging":
        ids, targets = list(start), [IGNORE] * len(start)
        for word, tag in zip(item.tokens, item.tags, strict=True):
            pieces = tokenizer.encode(word if not ids[len(start) :] else " " + word)
            pieces = pieces or tokenizer.encode(word)
            if not pieces:
                raise CorpusError(f"{item.where}: word {word!r} encodes to no tokens")
            ids += pieces
            targets += [label_id(labels, tag, item)] + [IGNORE] * (len(pieces) - 1)
        ids, targets = ids + end, targets + [IGNORE] * len(end)
        return {"ids": ids[:max_len], "types": [0] * len(ids[:max_len]), "y": targets[:max_len]}
    if task == "qa":
        return _encode_qa(item, tokenizer, start, end, max_len)
    ids = start + tokenizer.encode(item.text) + end
    types = [0] * len(ids)
    if item.text_pair is not None:
        second = tokenizer.encode(item.text_pair) + end
        ids, types = ids + second, types + [1] * len(second)
    y = item.label if task == "regression" else label_id(labels, str(item.label), item)
    return {"ids": ids[:max_len], "types": types[:max_len], "y": y}


def _encode_qa(item: Item, tokenizer, start: list[int], end: list[int], max_len: int) -> dict:
    """[CLS] question [SEP] context [SEP] with the answer's token span as the target. The context
    is encoded as before-answer, answer, after-answer pieces, so the span is exact in tokens
    (at word boundaries this equals encoding the context whole)."""
    context, a = item.text_pair, item.answer_start
    before, answer, after = context[:a], item.label, context[a + len(item.label) :]
    question = start + tokenizer.encode(item.text) + end
    pre = tokenizer.encode(before.rstrip()) if before.strip() else []
    span = tokenizer.encode((" " if before[-1:].isspace() and pre else "") + answer)
    tail = tokenizer.encode(after)
    ids = question + pre + span + tail + end
    first = len(question) + len(pre)
    if not span or first + len(span) > max_len:
        raise CorpusError(f"{item.where}: the answer does not fit in max_len {max_len} tokens")
    types = [0] * len(question) + [1] * (len(ids) - len(question))
    return {
        "ids": ids[:max_len],
        "types": types[:max_len],
        "y": [first, first + len(span) - 1],
        "answer": answer,
        "context": [len(question), min(first + len(span) + len(tail), max_len)],
    }


def collate(rows: list[dict], pad_id: int, task: Task) -> dict[str, torch.Tensor]:
    """Right-padded tensors of encoded items."""
    T = max(len(r["ids"]) for r in rows)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (T - len(r[key])) for r in rows])

    batch = {
        "input_ids": pad("ids", pad_id),
        "token_type_ids": pad("types", 0),
        "attention_mask": torch.tensor(
            [[1] * len(r["ids"]) + [0] * (T - len(r["ids"])) for r in rows]
        ),
    }
    if task == "tagging":
        batch["labels"] = pad("y", IGNORE)
    elif task == "qa":
        batch["labels"] = torch.tensor([r["y"] for r in rows])  # (B, 2): start, end
    else:
        dtype = torch.float32 if task == "regression" else torch.long
        batch["labels"] = torch.tensor([r["y"] for r in rows], dtype=dtype)
    return batch


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    if task == "qa":  # mean of the start and end cross-entropies (BERT's SQuAD loss)
        start = F.cross_entropy(logits[..., 0].float(), labels[:, 0])
        return (start + F.cross_entropy(logits[..., 1].float(), labels[:, 1])) / 2
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)


# ---- metrics ---------------------------------------------------------------------------------
def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO sequence; an I- tag that continues nothing starts a
    span (CoNLL-2003 scoring)."""
    spans, current = set(), None
    for i, tag in enumerate([*tags, "O"]):
        kind, _, name = tag.partition("-")
        if current is not None and not (kind == "I" and name == current[0]):
            spans.add((current[0], current[1], i))
            current = None
        if kind == "B" or (kind == "I" and current is None):
            current = (name, i)
    return spans


def span_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    """Micro-averaged F1 of exactly matching spans."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, predicted, strict=True):
        gs, ps = bio_spans(g), bio_spans(p)
        tp, n_gold, n_pred = tp + len(gs & ps), n_gold + len(gs), n_pred + len(ps)
    return 2 * tp / (n_gold + n_pred) if n_gold + n_pred else 1.0


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of normalised answers (Rajpurkar et al. 2016's evaluation script)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_span(start: torch.Tensor, end: torch.Tensor, context: torch.Tensor, longest: int = 30):
    """(i, j) maximising start[i] + end[j] over context tokens with i <= j < i + longest."""
    scores = start[:, None] + end[None, :]
    T = len(start)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (j >= i) & (j < i + longest) & context[:, None] & context[None, :]
    flat = int(scores.masked_fill(~ok, float("-inf")).argmax())
    return flat // T, flat % T


@torch.no_grad()
def evaluate(
    model: TaskModel,
    rows: list[dict],
    task: Task,
    labels: list[str],
    pad_id: int,
    batch_size=32,
    decode=None,
) -> dict[str, float]:
    """accuracy (classification), mse (regression), span_f1 and token accuracy (tagging), or
    SQuAD exact_match and f1 of the decoded best spans (qa; needs `decode`, ids -> text)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    squares, gold, predicted = 0.0, [], []
    for i in range(0, len(rows), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id, task).items()
        }
        logits = model(batch)
        y = batch["labels"]
        if task == "qa":
            for row, lg in zip(rows[i : i + batch_size], logits, strict=True):
                context = torch.zeros(len(lg), dtype=torch.bool)
                context[row["context"][0] : row["context"][1]] = True  # no question, no [SEP]
                a, b = best_span(lg[:, 0].float().cpu(), lg[:, 1].float().cpu(), context)
                text = decode(row["ids"][a : b + 1]).strip()
                right += int(normalize_answer(text) == normalize_answer(row["answer"]))
                squares += squad_f1(text, row["answer"])
                total += 1
            continue
        if task == "regression":
            squares += float(((logits.squeeze(-1).float() - y) ** 2).sum())
            total += len(y)
            continue
        guess = logits.argmax(-1)
        keep = y != IGNORE
        right += int((guess[keep] == y[keep]).sum())
        total += int(keep.sum())
        if task == "tagging":
            for g_row, y_row in zip(guess, y, strict=True):
                k = y_row != IGNORE
                gold.append([labels[t] for t in y_row[k].tolist()])
                predicted.append([labels[t] for t in g_row[k].tolist()])
    model.train(was_training)
    if task == "regression":
        return {"mse": squares / max(total, 1)}
    if task == "qa":
        return {"exact_match": right / max(total, 1), "f1": squares / max(total, 1)}
    out = {"accuracy": right / max(total, 1)}
    if task == "tagging":
        out["span_f1"] = span_f1(gold, predicted)
    return out


# ---- training --------------------------------------------------------------------------------
@dataclass
class FreezeConfig:
    """Which layers train: frozen embeddings and bottom blocks, gradual unfreezing, layer-wise
    learning rates."""

    freeze_embeddings: bool = field_(False, "keep the embeddings frozen")
    freeze_layers: int = field_(0, "bottom blocks kept frozen (implies frozen embeddings)", ge=0)
    unfreeze_every: int = field_(
        0,
        "gradual unfreezing (ULMFiT): the head first, one more block every N steps (0: off)",
        ge=0,
    )
    lr_decay: float = field_(
        1.0, "discriminative rates: each block down trains at lr x this (ULMFiT: 1/2.6)", gt=0, le=1
    )

    def floor(self) -> int:
        """The lowest layer group that ever trains (0: the embeddings)."""
        return self.freeze_layers + 1 if self.freeze_layers or self.freeze_embeddings else 0


def train_task(
    model: TaskModel,
    rows: list[dict],
    task: Task,
    freeze: FreezeConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    log=None,
) -> torch.optim.Optimizer:
    """AdamW on the trainable layers for `steps` steps of shuffled batches, linear warmup then
    linear decay; returns the optimizer (its state covers only layers that trained)."""
    groups = layer_groups(model.backbone)
    check_freeze_depth(model.backbone, freeze.freeze_layers)
    groups[-1] += list(p for p in model.head.parameters() if all(p is not q for q in groups[-1]))
    floor = freeze.floor()
    unfreezer = Unfreezer(groups, floor, freeze.unfreeze_every)
    optimizer = torch.optim.AdamW(
        param_groups(groups, floor, lr, freeze.lr_decay), weight_decay=weight_decay
    )
    device = next(model.parameters()).device
    order: list[int] = []
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        unfreezer.apply(step)
        if len(order) < batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[:batch_size], order[batch_size:]
        batch = collate([rows[i] for i in picked], pad_id, task)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = task_loss(model(batch), batch["labels"], task)
        loss.backward()
        if step < warmup_steps:
            scale = (step + 1) / warmup_steps
        else:
            scale = 1.0 - (step - warmup_steps) / max(steps - warmup_steps, 1)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None:
            log(
                {
                    "step": step + 1,
                    "loss": loss.item(),
                    "lowest_trainable": unfreezer.lowest_trainable(step),
                }
            )
    return optimizer


# ---- the command -----------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Fine-tune a model with a task head: classification, regression or BIO tagging."""

    model: str = field_("", "model: lmforge checkpoint or run, Hugging Face directory")
    task: Task = field_(
        "classification", "classification, regression, tagging (BIO tags) or qa (extractive)"
    )
    data: str = field_(
        "",
        "training file: CSV/JSONL of text[,text_pair],label; tokens,tags; or "
        "context,question,answer[,answer_start] (empty: toy set)",
    )
    eval_data: str = field_("", "held-out file in the same format (empty: split off test_fraction)")
    test_fraction: float = field_(
        0.2, "share of the items held out when eval_data is empty", gt=0, le=0.9
    )
    toy_items: int = field_(400, "items of the rule-generated set when data is empty", ge=2)
    out: str = field_("runs/finetune", "output directory")
    pooling: Pooling = field_(
        "cls", "sequence vector: first token ([CLS], through a pooler if any), mean, or last token"
    )
    max_len: int = field_(128, "longest encoded item in tokens (longer ones are cut)", ge=2)
    freeze: FreezeConfig = field_(FreezeConfig(), "frozen layers and layer-wise learning rates")
    steps: int = field_(100, "optimizer steps", ge=1)
    batch_size: int = field_(16, "items per step", ge=1)
    lr: float = field_(1e-4, "peak learning rate (of the head and the top layers)", gt=0)
    warmup_steps: int = field_(10, "linear warmup steps", ge=0)
    weight_decay: float = field_(0.01, "AdamW weight decay", ge=0)
    seed: int = field_(0, "seed of the head's init, the toy set and the batch order")
    device: str = field_("cpu", "device to train on")


def finetune(config: FinetuneConfig) -> dict:
    """Train the head (and the unfrozen layers); write out/model, head.safetensors, head.json,
    labels.json and metrics.json with the held-out scores before and after."""
    from lmforge.loading import load, load_tokenizer
    from lmforge.train.checkpoint import save_model

    if not config.model:
        raise ConfigError("model: give a checkpoint (lmforge or Hugging Face directory)")
    model, tokenizer = load(config.model), load_tokenizer(config.model)
    task = config.task
    items = read_items(config.data, task) if config.data else toy_items(task, config.toy_items)
    if config.eval_data:
        train_items, test_items = items, read_items(config.eval_data, task)
    else:
        cut = len(items) - max(1, int(len(items) * config.test_fraction))
        train_items, test_items = items[:cut], items[cut:]
    labels = build_label_map(train_items, task)
    ids = {name: i for i, name in enumerate(labels)}
    max_len = min(config.max_len, model.config.max_seq_len)
    train_rows = [encode_item(it, tokenizer, task, ids, max_len) for it in train_items]
    test_rows = [encode_item(it, tokenizer, task, ids, max_len) for it in test_items]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    torch.manual_seed(config.seed)
    net = TaskModel(model, make_head(model, task, len(labels), config.pooling))
    net.to(torch.device(config.device))
    before = evaluate(net, test_rows, task, labels, pad_id, decode=tokenizer.decode)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "finetune.yaml")
    with (out / "metrics.jsonl").open("w") as f:
        start = time.perf_counter()
        train_task(
            net,
            train_rows,
            task,
            config.freeze,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            pad_id=pad_id,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            seed=config.seed,
            log=lambda r: f.write(json.dumps(r) + "\n"),
        )
        seconds = time.perf_counter() - start
    after = evaluate(net, test_rows, task, labels, pad_id, decode=tokenizer.decode)
    net.eval()
    save_model(model, out / "model", tokenizer=tokenizer)
    save_file(
        {k: v.detach().contiguous() for k, v in net.head.state_dict().items()},
        str(out / "head.safetensors"),
    )
    (out / "labels.json").write_text(json.dumps(labels, ensure_ascii=False, indent=1))
    head = {"task": task, "pooling": config.pooling, "n_labels": len(labels)}
    (out / "head.json").write_text(json.dumps(head, indent=1))
    result = {
        "task": task,
        "train_items": len(train_rows),
        "test_items": len(test_rows),
        "before": before,
        "after": after,
        "train_seconds": round(seconds, 3),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "config": to_dict(config),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    key = {"regression": "mse", "tagging": "span_f1", "qa": "exact_match"}.get(task, "accuracy")
    print(f"{task}: held-out {key} {before[key]:.3f} -> {after[key]:.3f} ({seconds:.1f} s); {out}")
    return result


def load_task_model(path: str | Path) -> tuple[TaskModel, list[str]]:
    """A `finetune` output directory back as (model with its head, in eval mode; labels)."""
    from lmforge.loading import load

    path = Path(path)
    spec = json.loads((path / "head.json").read_text())
    backbone = load(path / "model")
    head = make_head(backbone, spec["task"], spec["n_labels"], spec["pooling"])
    head.load_state_dict(load_file(str(path / "head.safetensors")))
    labels = json.loads((path / "labels.json").read_text())
    return TaskModel(backbone, head).eval(), labels
