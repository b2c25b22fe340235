import pytest

from lmforge.errors import ConfigError
from lmforge.experiments.space import all_fields, grid_size, parse_space
from lmforge.train.pretrain import PretrainConfig


def test_parses_every_kind_and_coerces_values():
    params = parse_space(
        PretrainConfig,
        {
            "train.lr": {"loguniform": ["1e-4", 1.0e-2]},  # YAML 1.1 reads 1e-4 as a string
            "train.warmup_steps": {"int": [0, 100], "step": 25},
            "model.mlp": {"choice": ["swiglu", "gelu"]},
            "train.weight_decay": {"uniform": [0.0, 0.2]},
        },
    )
    lr, warmup, mlp, wd = params
    assert (lr.kind, lr.low, lr.high) == ("loguniform", 1e-4, 1e-2)
    assert warmup.grid() == [0, 25, 50, 75, 100]
    assert mlp.values == ("swiglu", "gelu")
    assert grid_size([warmup, mlp]) == 10
    with pytest.raises(ConfigError, match="has no grid"):
        wd.grid()


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lrr": {"uniform": [0, 1]}}, "did you mean 'train.lr'"),
        ({"trian.lr": {"uniform": [0, 1]}}, "did you mean 'train.lr'"),
        ({"train": {"uniform": [0, 1]}}, "is a section"),
        ({"train.lr": {"uniform": [0.1, 0.1]}}, "empty range"),
        ({"train.weight_decay": {"loguniform": [0.0, 0.1]}}, "low > 0"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, "must be > 0"),  # the field's bound
        ({"train.lr": {"choice": []}}, "non-empty list"),
        ({"train.steps": {"choice": ["many"]}}, "expected an integer"),
        ({"train.steps": {"int": [0, 10]}}, ">= 1"),  # the field's own bound applies
        ({"model.mlp": {"choice": ["swiglu", "relu6"]}}, "not one of"),
        ({"train.lr": {"normal": [0, 1]}}, "expected one of"),
        ({"train.lr": {"uniform": [0, 1], "choice": [1]}}, "one distribution"),
        ({}, "at least one field"),
    ],
)
def test_bad_spaces_name_the_problem(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(PretrainConfig, space)


def test_all_fields_lists_nested_leaves():
    names = all_fields(PretrainConfig)
    assert "train.lr" in names and "model.d_model" in names and "data" in names
    assert "train" not in names
