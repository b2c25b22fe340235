import json

import pytest
import yaml

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.experiments import registry
from lmforge.experiments.registry import (
    RunsBestConfig,
    RunsCompareConfig,
    RunsDeleteConfig,
    RunsListConfig,
    RunsTagConfig,
)


def pretrain_run(path, lr, losses, init_from=""):
    (path / "model").mkdir(parents=True)
    (path / "model" / "config.yaml").write_text("d_model: 32\n")
    (path / "checkpoints" / "step_1").mkdir(parents=True)
    (path / "checkpoints" / "step_1" / "metrics.jsonl").write_text("{}\n")  # not a run
    config = {"data": "shards", "init_from": init_from, "train": {"lr": lr, "steps": len(losses)}}
    (path / "run.yaml").write_text(yaml.safe_dump(config))
    with open(path / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "loss": loss + 0.1, "val_loss": loss}) + "\n")
    return path


@pytest.fixture
def root(tmp_path):
    runs = tmp_path / "runs"
    pretrain_run(runs / "a", 1e-3, [5.0, 4.0, 3.5])
    pretrain_run(runs / "b", 1e-2, [5.0, 3.0, 2.5])
    pretrain_run(runs / "c", 1e-2, [5.0, 3.2, 2.9], init_from=str(runs / "b" / "model"))
    sft = runs / "sft1"
    sft.mkdir()
    (sft / "sft.yaml").write_text(yaml.safe_dump({"model": str(runs / "b" / "model")}))
    (sft / "sft.json").write_text(json.dumps({"after": {"exact_match": 0.4}}))
    return runs


def test_finds_runs_with_kind_metrics_and_lineage(root):
    runs = {r["path"].rsplit("/", 1)[-1]: r for r in registry.find_runs([str(root)])}
    assert set(runs) == {"a", "b", "c", "sft1"}  # checkpoints/ and model/ are not runs
    assert runs["b"]["kind"] == "pretrain" and runs["b"]["status"] == "finished"
    assert runs["b"]["metrics"]["val_loss"] == 2.5 and runs["b"]["steps"] == 3
    assert runs["c"]["parent"] == str(root / "b" / "model")
    assert runs["sft1"]["kind"] == "sft"
    assert runs["sft1"]["metrics"]["sft.after.exact_match"] == 0.4


def test_list_filters_by_metric_config_and_kind(root, capsys):
    def names(*where):
        runs = registry.list_command(
            from_dict(RunsListConfig, {"root": [str(root)], "where": list(where)})
        )
        return sorted(r["path"].rsplit("/", 1)[-1] for r in runs)

    assert names("val_loss<3") == ["b", "c"]
    assert names("train.lr=0.01", "val_loss>=2.6") == ["c"]
    assert names("kind=sft") == ["sft1"]
    assert names("init_from~b/model") == ["c"]
    assert "val_loss" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="cannot read"):
        names("val_loss")


def test_best_returns_a_loadable_path_and_names_unknown_metrics(root):
    best = registry.best_command(from_dict(RunsBestConfig, {"root": [str(root)]}))
    assert best == str(root / "b" / "model")
    top = registry.best_command(
        from_dict(
            RunsBestConfig, {"root": [str(root)], "metric": "sft.after.exact_match", "mode": "max"}
        )
    )
    assert top == str(root / "sft1")
    with pytest.raises(ConfigError, match="did you mean 'val_loss'"):
        registry.best_command(from_dict(RunsBestConfig, {"root": [str(root)], "metric": "val_los"}))


def test_compare_shows_the_config_diff(root, capsys):
    result = registry.compare_command(
        from_dict(RunsCompareConfig, {"runs": [str(root / "a"), str(root / "c")]})
    )
    assert result["diff"]["train.lr"] == [1e-3, 1e-2]
    assert "data" not in result["diff"]  # equal in both
    assert "started from" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="two or more"):
        registry.compare_command(from_dict(RunsCompareConfig, {"runs": [str(root / "a")]}))


def test_tag_and_delete(root, tmp_path):
    registry.tag_command(
        from_dict(RunsTagConfig, {"run": str(root / "a"), "add": ["baseline", "x"]})
    )
    tags = registry.tag_command(from_dict(RunsTagConfig, {"run": str(root / "a"), "remove": ["x"]}))
    assert tags == ["baseline"] and registry.read_run(root / "a")["tags"] == ["baseline"]
    # Tagged runs are kept; nothing is deleted without --yes; a non-run fails before anything goes.
    with pytest.raises(ConfigError, match="tagged runs are kept"):
        registry.delete_command(
            from_dict(RunsDeleteConfig, {"runs": [str(root / "a")], "yes": True})
        )
    assert registry.delete_command(from_dict(RunsDeleteConfig, {"runs": [str(root / "b")]})) == []
    assert (root / "b").is_dir()
    (tmp_path / "notarun").mkdir()
    with pytest.raises(ConfigError, match="not a run directory"):
        registry.delete_command(
            from_dict(
                RunsDeleteConfig,
                {"runs": [str(root / "b"), str(tmp_path / "notarun")], "yes": True},
            )
        )
    assert (root / "b").is_dir()
    registry.delete_command(from_dict(RunsDeleteConfig, {"runs": [str(root / "b")], "yes": True}))
    assert not (root / "b").exists()
