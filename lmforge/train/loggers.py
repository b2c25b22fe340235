"""Optional metric sinks next to metrics.jsonl: TensorBoard and Weights & Biases.

Neither is a dependency of lmforge: each is used only when asked for (train.log_tensorboard,
train.log_wandb) and installed, and asking for a missing one is an error before training starts,
not a silently missing dashboard. Only rank 0 creates them (it alone writes metrics).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError

# The packages to import, and what to install for them.
_PACKAGES = {"log_tensorboard": ("tensorboard", "tensorboard"), "log_wandb": ("wandb", "wandb")}


def check_available(log_tensorboard: bool, log_wandb: bool) -> None:
    for option, on in (("log_tensorboard", log_tensorboard), ("log_wandb", log_wandb)):
        module, package = _PACKAGES[option]
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.{option}=true but the `{module}` package is not installed; "
                f"`pip install {package}` or turn the option off"
            )


class MetricSinks:
    """Forwards every numeric field of a metrics.jsonl record, at its step, to the chosen sinks
    (TensorBoard under out_dir/tensorboard, W&B in out_dir/wandb)."""

    def __init__(self, out_dir: Path, *, tensorboard: bool, wandb: bool, config: dict) -> None:
        check_available(tensorboard, wandb)
        self.tb = self.run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_module

            # The mode (online/offline/disabled) comes from WANDB_MODE, as W&B users expect.
            self.run = wandb_module.init(
                project="lmforge", name=out_dir.name, dir=str(out_dir), config=config
            )

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if step is None or not scalars:
            return
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.run is not None:
            # W&B's step must increase: it drops the steps replayed after a loss-spike
            # rollback, with a warning (metrics.jsonl keeps them).
            self.run.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.run is not None:
            self.run.finish()
