import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import CheckpointError, LmforgeError
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Large language models are trained on a lot of text; tokenizers split it into pieces.\n",
    "def train(model, data):\n\tfor batch in data:\n\t\tloss = model(batch)\n\treturn loss\n",
    "大语言模型的预训练需要大量的文本数据。",
    "Émigré café naïve résumé — “quotes” and ‘more’.",
    "Numbers 12345 67890 and symbols !@#$%^&*() [] {} <> | \\ / ~",
] * 20

SAMPLES = [
    "",
    "大语言模型的预训练",
    "👨‍👩‍👧‍👦 family, 🇯🇵🇫🇷 flags, 👍🏽 skin tone",
    "def f(x):\n\treturn x\t+\t1\n",
    "a    b\n\n\n\nc          \t\t  d  ",
    "line one\r\nline two\r\n",
    "e\u0301 combining a\u0308\u0308 marks",
    "<|bos|>literal<|im_start|>user\nspecial<|im_end|> strings",
    "\x00\x01 control \ufeff bom \U0010ffff",
]

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_samples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_roundtrip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocab_and_merges_learned(tok):
    assert 256 + len(DEFAULT_SPECIAL_TOKENS) < tok.vocab_size <= 400
    # Frequent words became single tokens, so BPE really merged something.
    assert len(tok.encode(" quick")) == 1


def test_special_tokens(tok):
    ids = [tok.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(ids)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(ids[:3])
    assert tok.id_to_token(tok.eos_id) == "<|eos|>"
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    plain = tok.encode("hello")
    assert tok.encode("hello", add_bos=True, add_eos=True) == [tok.bos_id, *plain, tok.eos_id]
    with_specials = tok.encode("hi", add_bos=True, add_eos=True)
    assert tok.decode(with_specials, skip_special_tokens=True) == "hi"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    assert tok.encode_batch(SAMPLES, add_eos=True) == [tok.encode(s, add_eos=True) for s in SAMPLES]
    assert tok.decode_batch(tok.encode_batch(SAMPLES)) == SAMPLES


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|bos|>" and config["eos_token"] == "<|eos|>"
    for loaded in (
        Tokenizer.load(tmp_path / "tok"),
        Tokenizer.load(tmp_path / "tok/tokenizer.json"),
    ):
        assert loaded.vocab_size == tok.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
        assert loaded.sha256 == tok.sha256


def test_saved_tokenizer_loads_in_transformers(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    ours = Tokenizer(tok.backend, chat_template=template)
    ours.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    for generation in (True, False):
        expected = hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=generation
        )
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=generation) == expected
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected


def _wordpiece(path):
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    cls_sep = [("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=cls_sep
    )
    backend.save(str(path))


def _gpt2_style_bpe(path):
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|endoftext|>"], show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.save(str(path))


@pytest.mark.parametrize("build", [_wordpiece, _gpt2_style_bpe])
def test_load_hf_tokenizer_json_as_is(build, tmp_path):
    from transformers import PreTrainedTokenizerFast

    file = tmp_path / "tokenizer.json"
    build(file)
    ours = Tokenizer.load(file)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(file))
    texts = ["Hello, World!", "The lazy dog's résumé", "大语言模型 café", "  spaced   out\n"]
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.vocab_size == len(hf)


def test_recognises_common_special_names(tmp_path):
    file = tmp_path / "tokenizer.json"
    _gpt2_style_bpe(file)
    tok = Tokenizer.load(file)
    eos = tok.token_to_id("<|endoftext|>")
    assert tok.eos_id == eos and tok.bos_id is None and tok.pad_id is None
    assert tok.encode("hi", add_eos=True)[-1] == eos
    with pytest.raises(LmforgeError, match="no bos token"):
        tok.encode("hi", add_bos=True)


def test_config_tokens_as_dicts_and_template_list(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "__type": "AddedToken"},
        "eos_token": "<|im_end|>",
        "pad_token": None,
        "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}!"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.bos_id == tok.token_to_id("<|im_start|>")
    assert loaded.eos_id == tok.token_to_id("<|im_end|>")
    assert loaded.pad_id == tok.pad_id  # absent from the config: found by its common name
    assert loaded.apply_chat_template(MESSAGES) == "You are helpful.!"


def test_chatml_without_template(tok):
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(MESSAGES) == expected
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")
    ids = tok.encode(expected)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5
    assert tok.decode(ids) == expected


def test_chat_without_template_or_chatml_tokens(tmp_path):
    _wordpiece(tmp_path / "tokenizer.json")
    with pytest.raises(LmforgeError, match="no chat template and no ChatML tokens"):
        Tokenizer.load(tmp_path).apply_chat_template(MESSAGES)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 261"):
        train_bpe(CORPUS, vocab_size=260)
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(CORPUS, vocab_size=200, special_tokens=["<|eos|>"])


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m['content'] }", "failed to render"),  # syntax error
        ("{{ messages[0]['content'].nope() }}", "failed to render"),  # undefined method
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ],
)
def test_chat_template_that_fails_to_render(template, message):
    tok = Tokenizer(train_bpe(CORPUS, vocab_size=300).backend, chat_template=template)
    with pytest.raises(LmforgeError, match=message):
        tok.apply_chat_template(MESSAGES)
