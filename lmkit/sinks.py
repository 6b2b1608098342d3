"""Where training metrics go besides runs/<run>/metrics.jsonl: TensorBoard event files (read by
`tensorboard --logdir PROJECT/runs`) and Weights & Biases (offline unless you are logged in).
Both are optional extras; asking for one that is not installed is a one-line error naming the
install command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmkit.config import ConfigError

_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


class Sinks:
    """The sinks of train.log (TrainConfig.log_sinks, checked) for one run: log(record) after each
    metrics row, close() at the end."""

    def __init__(self, kinds: list[str], run_dir: Path, run: str, config: dict[str, Any]) -> None:
        self.writers: list[Any] = []
        self.wandb = None
        for kind in kinds:
            try:
                if kind == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self.writers.append(SummaryWriter(log_dir=str(run_dir)))
                else:
                    import wandb

                    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                    self.wandb = wandb.init(dir=str(run_dir), name=run, project=run_dir.parent.parent.name,
                                            config=config, mode=mode, reinit=True)
            except ImportError:
                raise ConfigError(f"--log {kind} needs the {kind} package: {_INSTALL[kind]}") from None

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for writer in self.writers:
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()
