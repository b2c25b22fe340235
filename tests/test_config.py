from dataclasses import dataclass
from typing import Literal

import pytest

from lmforge.config import build, field_, from_dict, help_text, parse_overrides, save_yaml, to_dict
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig
from lmforge.train.pretrain import PretrainConfig


@dataclass
class Inner:
    rate: float = field_(0.5, "a rate", ge=0, le=1)
    kind: Literal["a", "b"] = field_("a", "a choice")


@dataclass
class Outer:
    name: str = field_("x", "a name")
    count: int = field_(3, "a count", ge=1)
    tags: list[str] = field_([], "tags")
    pair: tuple[float, float] = field_((0.9, 0.95), "a pair")
    maybe: int | None = field_(None, "optional")
    inner: Inner = field_(Inner(), "nested section")


def test_defaults_are_independent():
    a, b = Outer(), Outer()
    a.tags.append("t")
    a.inner.rate = 0.1
    assert b.tags == [] and b.inner.rate == 0.5


def test_nested_build_and_coercion():
    cfg = from_dict(
        Outer,
        {
            "count": 5,
            "tags": "one",
            "pair": [0.8, 0.9],
            "inner": {"rate": 1, "kind": "b"},
            "maybe": 7,
        },
    )
    assert cfg.count == 5 and cfg.tags == ["one"] and cfg.pair == (0.8, 0.9)
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float) and cfg.inner.kind == "b"
    assert cfg.maybe == 7


@dataclass
class Command:
    """A command whose nested section defaults to a non-default instance (like `lmforge run`'s
    demo model and training settings)."""

    inner: Inner = field_(Inner(rate=0.25, kind="b"), "tuned defaults")


def test_overriding_one_nested_field_keeps_the_commands_other_defaults():
    cfg = build(Command, None, ["--inner.rate=0.75"])
    assert cfg.inner.rate == 0.75 and cfg.inner.kind == "b"  # not Inner's class default "a"
    assert build(Command, None, []).inner == Inner(rate=0.25, kind="b")
    from lmforge.run import RunConfig

    run = build(RunConfig, None, ["--train.steps=150", "--model.n_layers=2"])
    demo = RunConfig()
    assert (run.train.steps, run.model.n_layers) == (150, 2)
    assert run.train.time_limit_s == demo.train.time_limit_s > 0  # the demo's safety net stays
    assert run.train.warmup_steps == demo.train.warmup_steps
    assert run.model.vocab_size == demo.model.vocab_size


def test_a_value_that_looks_like_an_impossible_date_stays_text():
    assert parse_overrides(["--name=2024-13-01"]) == {"name": "2024-13-01"}
    assert build(Outer, None, ["--name=2024-13-01"]).name == "2024-13-01"


def test_unknown_key_suggests_closest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'inner.rat'.*did you mean 'inner.rate'"
    ):
        from_dict(Outer, {"inner": {"rat": 0.1}})
    with pytest.raises(ConfigError, match="did you mean 'model.d_model'"):
        from_dict(PretrainConfig, {"model": {"dmodel": 512}})


@pytest.mark.parametrize(
    "data, match",
    [
        ({"count": "many"}, "count: expected an integer"),
        ({"count": 0}, "count: must be >= 1"),
        ({"inner": {"rate": 1.5}}, r"inner.rate: must be <= 1"),
        ({"inner": {"kind": "c"}}, r"inner.kind: 'c' is not one of"),
        ({"pair": [1, 2, 3]}, "pair: expected 2 values"),
        ({"count": True}, "count: expected an integer"),
    ],
)
def test_bad_values_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_model_config_cross_field_validation():
    with pytest.raises(ConfigError, match="n_heads .* multiple of n_kv_heads"):
        from_dict(ModelConfig, {"n_heads": 4, "n_kv_heads": 3})
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        from_dict(ModelConfig, {"d_model": 100, "n_heads": 3})
    with pytest.raises(
        ConfigError, match="model.norm: 'rmsnrom' is not one of .*did you mean 'rmsnorm'"
    ):
        from_dict(PretrainConfig, {"model": {"norm": "rmsnrom"}})


def test_overrides_parse_and_win_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("count: 2\ninner:\n  rate: 0.25\n")
    args = ["--inner.kind=b", "--count", "9", "--tags=[a, b]", "--inner.rate=3e-1"]
    cfg = build(Outer, path, args)
    assert (cfg.count, cfg.tags, cfg.inner.kind, cfg.inner.rate) == (9, ["a", "b"], "b", 0.3)
    assert parse_overrides(["--flag"]) == {"flag": True}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["positional"])


def test_yaml_round_trip(tmp_path):
    cfg = from_dict(PretrainConfig, {"model": {"d_model": 64, "n_kv_heads": 2}, "out": "x"})
    save_yaml(cfg, tmp_path / "c.yaml")
    assert build(PretrainConfig, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["train"]["betas"] == [0.9, 0.95]


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        build(Outer, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        build(Outer, tmp_path / "missing.yaml")


def test_help_lists_every_field_with_default():
    text = help_text(PretrainConfig)
    for name in [
        "--model.d_model",
        "--model.n_kv_heads",
        "--train.lr",
        "--train.warmup_steps",
        "--data",
        "--out",
    ]:
        assert name in text
    assert "(default: 0.001)" in text and "peak learning rate" in text


def test_an_override_list_that_is_not_yaml_is_an_error_not_a_string():
    with pytest.raises(ConfigError, match=r"--prompts: cannot read .* as a YAML list"):
        parse_overrides(["--prompts=[What is X?]"])
    assert parse_overrides(['--prompts=["What is X?"]']) == {"prompts": ["What is X?"]}
    assert parse_overrides(["--note=a: b: c"]) == {"note": "a: b: c"}  # plain text stays text
