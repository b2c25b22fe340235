"""Batches of the pre-training objectives: T5 noise-mask arithmetic, span corruption round trip,
MLM 80/10/10, NSP pairs and segment ids, UL2 modes and corruption rates (no model needed)."""

import itertools
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from lmforge.data.shards import TokenShards
from lmforge.errors import ConfigError
from lmforge.train import objectives as O

EOS = 1


def write_document_shards(directory, vocab=200, docs=400, seed=0, pattern=False):
    """Documents of 20-120 ids in [3, vocab), each closed by EOS (id 1), as write_shards lays
    them out; no BOS. Random ids, or with `pattern` runs of consecutive ids (learnable)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def document():
        n = rng.integers(20, 120)
        if pattern:
            return 3 + (rng.integers(0, vocab - 3) + np.arange(n)) % (vocab - 3)
        return rng.integers(3, vocab, n)

    splits = {}
    for split, n in (("train", docs), ("validation", max(docs // 10, 20))):
        parts = [np.append(document(), EOS) for _ in range(n)]
        ids = np.concatenate(parts).astype(np.uint16)
        ids.tofile(directory / f"{split}_00000.bin")
        splits[split] = [{"file": f"{split}_00000.bin", "tokens": len(ids), "documents": n}]
    index = {
        "format": "lmforge-shards",
        "version": 1,
        "dtype": "uint16",
        "vocab_size": vocab,
        "bos_id": None,
        "eos_id": EOS,
        "splits": splits,
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return TokenShards(write_document_shards(tmp_path_factory.mktemp("docs")))


def model(arch="causal", vocab=400, nsp=False):
    return SimpleNamespace(vocab_size=vocab, arch=arch, nsp_head=nsp)


def occurs(shards, seq) -> bool:
    """Whether `seq` is a contiguous run of the train split's token stream."""
    stream = np.asarray(shards.shards[0]).astype(np.uint16).tobytes()
    needle = np.asarray(seq, dtype=np.uint16).tobytes()
    at = stream.find(needle)
    while at != -1 and at % 2:  # a match must start on a token boundary
        at = stream.find(needle, at + 1)
    return at != -1


# ---- T5 noise-mask arithmetic -------------------------------------------------------------------
@pytest.mark.parametrize(
    "length, density, span, noise, spans",
    [
        # Worked by hand: noise = round(length * density) (ties to even, as tf.round),
        # spans = max(1, round(noise / span)).
        (568, 0.15, 3, 85, 28),  # round(85.2) = 85, round(28.33) = 28
        (100, 0.15, 3, 15, 5),
        (10, 0.15, 3, 2, 1),  # round(1.5) = 2 (to even), round(0.67) = 1
        (30, 0.15, 3, 4, 1),  # round(4.5) = 4 (to even), round(1.33) = 1
        (128, 0.5, 3, 64, 21),
        (128, 0.15, 64, 19, 1),  # round(0.3) = 0 -> at least one span
        (1, 0.15, 3, 1, 1),  # degenerate lengths count as 2: one noise, one kept
    ],
)
def test_noise_span_counts_match_hand_arithmetic(length, density, span, noise, spans):
    assert O.noise_span_counts(length, density, span) == (noise, spans)


def test_t5_lengths_for_512_inputs():
    # T5's own numbers (random_spans_helper): 512 inputs need 568 raw tokens and give 114
    # targets; inputs = 568 - 85 + 28 + 1 (EOS), targets = 85 + 28 + 1.
    assert O.raw_length_for_inputs(512, 0.15, 3) == 568
    assert O.span_corruption_lengths(568, 0.15, 3) == (512, 114)
    assert O.span_corruption_lengths(569, 0.15, 3)[0] == 513


def test_noise_mask_has_the_counted_tokens_and_spans():
    rng = np.random.default_rng(0)
    for length, density, span in [(568, 0.15, 3), (97, 0.5, 3), (200, 0.15, 64), (64, 0.5, 8)]:
        noise, spans = O.noise_span_counts(length, density, span)
        for _ in range(20):
            mask = O.random_spans_noise_mask(length, density, span, rng)
            starts = mask & ~np.concatenate([[False], mask[:-1]])
            assert len(mask) == length and not mask[0]  # spans start with non-noise
            assert mask.sum() == noise and starts.sum() == spans


def test_every_noise_mask_is_equally_likely():
    # length 6, density 0.5, span 1.5: 3 noise tokens in 2 spans, 3 kept in 2 runs, so the masks
    # are (kept a, noise b, kept 3-a, noise 3-b) for a, b in {1, 2}: four, each 1/4.
    rng = np.random.default_rng(1)
    seen = Counter(tuple(O.random_spans_noise_mask(6, 0.5, 1.5, rng).tolist()) for _ in range(4000))
    expected = {
        tuple([False] * a + [True] * b + [False] * (3 - a) + [True] * (3 - b))
        for a, b in itertools.product((1, 2), repeat=2)
    }
    assert set(seen) == expected
    assert all(850 < c < 1150 for c in seen.values())


# ---- span corruption ----------------------------------------------------------------------------
def reconstruct(inputs, targets, sentinels):
    """The original tokens from (inputs, targets): each sentinel in the inputs is replaced by
    what follows the same sentinel in the targets, up to the next sentinel."""
    spans, current = {}, None
    for t in targets:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out += spans[t] if t in sentinels else [t]
    return out


def test_span_corruption_round_trip():
    rng = np.random.default_rng(2)
    sentinels = tuple(range(999, 899, -1))
    for length, density, span in [(50, 0.15, 3), (200, 0.5, 3), (300, 0.15, 64)]:
        tokens = rng.integers(3, 800, length)
        mask = O.random_spans_noise_mask(length, density, span, rng)
        inputs, targets = O.span_corrupt(tokens, mask, sentinels)
        noise, spans = O.noise_span_counts(length, density, span)
        assert len(inputs) == length - noise + spans and len(targets) == noise + spans
        assert list(inputs[np.isin(inputs, sentinels)]) == list(sentinels[:spans])
        assert reconstruct(inputs.tolist(), targets.tolist(), sentinels) == tokens.tolist()


def test_span_corruption_needs_enough_sentinels():
    mask = np.array([False, True, False, True, False, True])
    with pytest.raises(ValueError, match="3 noise spans but only 2 sentinel"):
        O.span_corrupt(np.arange(6), mask, (99, 98))


@pytest.mark.parametrize("arch", ["causal", "encoder_decoder"])
def test_span_batches_reconstruct_text_of_the_shards(shards, arch):
    source = O.objective_batches("span", model(arch), shards)
    specials = source.specials
    sentinels = set(specials.sentinels)
    # Sentinels count down from the top of the vocabulary (T5); the other specials sit below.
    assert specials.sentinels[:3] == (399, 398, 397) and specials.mask < 300
    batch = source.get_batch(8, 64, seed=0, step=3)
    for b in range(8):
        if arch == "encoder_decoder":
            n_in = int(batch["attention_mask"][b].sum())
            inputs = batch["input_ids"][b, :n_in].tolist()
            targets = [t for t in batch["labels"][b].tolist() if t != O.IGNORE_INDEX]
            # The decoder reads [start = pad] + targets[:-1] (teacher forcing).
            n_out = len(targets)
            assert batch["decoder_input_ids"][b, :n_out].tolist() == [specials.pad] + targets[:-1]
            assert n_in <= 64
        else:
            p = int(batch["prefix_len"][b])
            inputs = batch["input_ids"][b, :p].tolist()
            targets = [t for t in batch["labels"][b].tolist() if t != O.IGNORE_INDEX]
            # Loss only on the targets: labels start at the last input position.
            assert (batch["labels"][b, : p - 1] == O.IGNORE_INDEX).all()
            assert batch["input_ids"][b, p : p + len(targets) - 1].tolist() == targets[:-1]
        assert inputs[-1] == EOS and targets[-1] == EOS
        original = reconstruct(inputs[:-1], targets[:-1], sentinels)
        assert len(original) > 40 and occurs(shards, original)


def test_batches_are_a_function_of_seed_step_micro_step(shards):
    source = O.objective_batches("ul2", model("prefix"), shards)
    a = source.get_batch(4, 64, seed=1, step=5, micro_step=2)
    b = source.get_batch(4, 64, seed=1, step=5, micro_step=2)
    c = source.get_batch(4, 64, seed=1, step=6, micro_step=2)
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["input_ids"] == c["input_ids"]).all()


# ---- prefix LM ----------------------------------------------------------------------------------
def test_prefix_lm_batches(shards):
    batch = O.objective_batches("prefix", model("prefix"), shards).get_batch(64, 32, seed=0, step=0)
    ids, labels, prefix = batch["input_ids"], batch["labels"], batch["prefix_len"]
    assert ((prefix >= 1) & (prefix <= 32)).all() and len(set(prefix.tolist())) > 10
    for b in range(64):
        p = int(prefix[b])
        assert (labels[b, : p - 1] == O.IGNORE_INDEX).all()
        assert (labels[b, p - 1 : -1] == ids[b, p:]).all()  # next-token targets after the prefix
        assert occurs(shards, ids[b].tolist() + [int(labels[b, -1])])


# ---- masked LM + NSP ----------------------------------------------------------------------------
def test_mask_tokens_80_10_10_on_a_large_sample():
    rng = np.random.default_rng(3)
    ids = rng.integers(10, 1000, 200_000)
    maskable = rng.random(ids.shape) < 0.9
    inputs, labels = O.mask_tokens(
        ids, maskable, rng, mask_id=5, replacements=np.arange(10, 1000), probability=0.15
    )
    chosen = labels != O.IGNORE_INDEX
    assert chosen.sum() == round(0.15 * maskable.sum())
    assert not (chosen & ~maskable).any()  # never a special (non-maskable) position
    assert (labels[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    masked = (inputs[chosen] == 5).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    swapped = ((inputs[chosen] != 5) & (inputs[chosen] != ids[chosen])).mean()
    # 27,000 choices: a proportion's standard error is at most 0.003.
    assert abs(masked - 0.8) < 0.015 and abs(swapped - 0.1) < 0.01
    assert abs(kept - (0.1 + 0.1 / 990)) < 0.01  # a random id equals the original 1/990 of the time


def test_mlm_batches_never_mask_specials_and_keep_proportions(shards):
    source = O.objective_batches("mlm", model("encoder", nsp=True), shards)
    s = source.specials
    stats = Counter()
    for step in range(10):
        batch = source.get_batch(32, 128, seed=0, step=step)
        ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        chosen = labels != O.IGNORE_INDEX
        original = np.where(chosen, labels, ids)
        special = np.isin(original, list(s.ids))
        assert not (chosen & special).any()
        assert not (chosen & (batch["attention_mask"].numpy() == 0)).any()
        stats["chosen"] += int(chosen.sum())
        stats["maskable"] += int(((batch["attention_mask"].numpy() == 1) & ~special).sum())
        stats["mask"] += int((ids[chosen] == s.mask).sum())
        stats["same"] += int((ids[chosen] == labels[chosen]).sum())
    assert abs(stats["chosen"] / stats["maskable"] - 0.15) < 0.01
    assert abs(stats["mask"] / stats["chosen"] - 0.8) < 0.03
    assert abs(stats["same"] / stats["chosen"] - 0.1) < 0.03


def test_nsp_pairs_segments_and_labels(shards):
    source = O.objective_batches("mlm", model("encoder", nsp=True), shards)
    s = source.specials
    labels_seen = []
    for step in range(8):
        batch = source.get_batch(32, 96, seed=0, step=step)
        for b in range(32):
            original = np.where(
                batch["labels"][b] != O.IGNORE_INDEX, batch["labels"][b], batch["input_ids"][b]
            ).tolist()
            n = int(batch["attention_mask"][b].sum())
            row, types = original[:n], batch["token_type_ids"][b].tolist()
            assert row[0] == s.cls and row[-1] == s.sep and row.count(s.sep) == 2
            mid = row.index(s.sep)
            a_seg, b_seg = row[1:mid], row[mid + 1 : -1]
            # Segment ids: 0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding.
            assert types == [0] * (mid + 1) + [1] * (n - mid - 1) + [0] * (96 - n)
            assert EOS not in a_seg + b_seg and a_seg and b_seg
            label = int(batch["nsp_labels"][b])
            labels_seen.append(label)
            # Label 0: B continues A in the same document; label 1: B is from elsewhere.
            assert occurs(shards, a_seg + b_seg) == (label == 0)
    assert abs(np.mean(labels_seen) - 0.5) < 0.07  # 256 pairs: standard error 0.031


def test_mlm_without_nsp_is_one_segment(shards):
    batch = O.objective_batches("mlm", model("encoder"), shards).get_batch(4, 64, seed=0, step=0)
    assert "nsp_labels" not in batch and (batch["token_type_ids"] == 0).all()


# ---- UL2 ----------------------------------------------------------------------------------------
def test_ul2_modes_and_corruption_rates(shards):
    source = O.objective_batches("ul2", model("encoder_decoder"), shards)
    s = source.specials
    mode_of = {v: k for k, v in s.modes.items()}
    sentinels = set(s.sentinels)
    denoisers = [O.Denoiser.parse(d) for d in O.UL2_DENOISERS]
    modes = Counter()
    for step in range(12):
        batch = source.get_batch(32, 128, seed=0, step=step)
        for b in range(32):
            n_in = int(batch["attention_mask"][b].sum())
            inputs = batch["input_ids"][b, :n_in].tolist()
            targets = [t for t in batch["labels"][b].tolist() if t != O.IGNORE_INDEX]
            mode = mode_of[inputs[0]]
            modes[mode] += 1
            if mode == "S":  # a prefix and its continuation, no sentinels
                assert not sentinels & set(inputs + targets)
                assert occurs(shards, inputs[1:] + targets)
                assert len(targets) <= round(0.5 * (len(inputs) - 1 + len(targets))) + 1
                continue
            noise = len(targets) - 1 - len(sentinels & set(targets))
            spans = len(sentinels & set(targets))
            raw = n_in - 2 - spans + noise  # without the mode token and EOS
            # Exactly the counts of one of this mode's denoisers at this raw length.
            assert (noise, spans) in {
                O.noise_span_counts(raw, d.noise_density, d.mean_span)
                for d in denoisers
                if d.mode == mode and O._encoder_raw_length(d, 128) == raw
            }
    total = sum(modes.values())  # 384 rows: R 2/7, S 1/7, X 4/7 of the paper's seven
    assert abs(modes["R"] / total - 2 / 7) < 0.07
    assert abs(modes["S"] / total - 1 / 7) < 0.06
    assert abs(modes["X"] / total - 4 / 7) < 0.08


def test_ul2_weights_select_denoisers(shards):
    options = O.ObjectiveOptions(ul2_denoisers=["X:32:0.5", "S:0.25"], ul2_weights=[1, 0])
    source = O.objective_batches("ul2", model("prefix"), shards, options=options)
    batch = source.get_batch(16, 128, seed=0, step=0)
    assert (batch["input_ids"][:, 0] == source.specials.modes["X"]).all()
    # X with mean span 32 at 50%: each row holds n raw tokens, round(n / 2) of them noise in
    # round(noise / 32) spans, and [X] + inputs + targets fill the 129 tokens before the shift.
    n = O._decoder_raw_length(O.Denoiser("X", 0.5, 32), 128)
    noise, spans = round(n / 2), round(round(n / 2) / 32)
    assert 1 + (n - noise + spans + 1) + (noise + spans + 1) in (128, 129)
    sentinels = set(source.specials.sentinels)
    for b in range(16):
        targets = [t for t in batch["labels"][b].tolist() if t != O.IGNORE_INDEX]
        assert len(sentinels & set(targets)) == spans and len(targets) == noise + spans + 1


def test_bad_combinations_name_both_settings(shards):
    with pytest.raises(ConfigError, match="objective='mlm'.*model.arch='encoder'"):
        O.objective_batches("mlm", model("causal"), shards)
    with pytest.raises(ConfigError, match="nsp=true.*model.nsp_head"):
        O.objective_batches("mlm", model("encoder"), shards, options=O.ObjectiveOptions(nsp=True))
    with pytest.raises(ConfigError, match="model.vocab_size=307"):
        O.objective_batches("span", model("causal", vocab=250), shards)
    with pytest.raises(ConfigError, match="ul2_weights"):
        O.ObjectiveOptions(ul2_weights=[1.0]).validate()
    with pytest.raises(ConfigError, match="ul2_denoisers"):
        O.ObjectiveOptions(ul2_denoisers=["Q:3"]).validate()
