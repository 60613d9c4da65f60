"""Where training logs go besides the JSONL files (which are always written): TensorBoard and Weights &
Biases, as ``--report-to`` in Hugging Face's Trainer.

``Reporters(names, output_dir, config)`` opens each; ``log(record)`` sends a record's numbers (a
``train_step`` record under ``train/``, an ``eval`` record under ``eval/``) at its step; ``close()`` flushes.
TensorBoard writes under ``OUTPUT_DIR/runs`` (needs the ``tensorboard`` package); W&B uses
``$WANDB_PROJECT`` (default ``mmprm-infer``) and W&B's own settings (``WANDB_MODE=offline`` works without a
network).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Reporters", "REPORT_TO"]

REPORT_TO = ("tensorboard", "wandb")


class Reporters:
    def __init__(self, names: Sequence[str], output_dir: str | os.PathLike | None, config: dict):
        unknown = [n for n in names if n not in REPORT_TO]
        if unknown:
            raise ValueError(f"report_to: unknown {unknown}; choose from {REPORT_TO}")
        if names and output_dir is None:
            raise ValueError("report_to needs output_dir (the logs are written under it)")
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter  # tensorboard: optional (the train extra)
            except ImportError as exc:
                raise ValueError(f"report_to tensorboard needs the tensorboard package (pip install tensorboard): "
                                 f"{exc}") from None
            # the trainer always passes its output folder
            self.tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))  # type: ignore[arg-type]
        if "wandb" in names:
            try:
                import wandb  # wandb: optional (the wandb extra)
            except ImportError:
                raise ValueError("report_to wandb needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mmprm-infer"), dir=str(output_dir),
                                    config=config)

    def log(self, record: dict) -> None:
        prefix = "eval" if record.get("event") == "eval" else "train"
        numbers = {f"{prefix}/{k}": float(v) for k, v in record.items()
                   if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(record.get("step", 0))
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
