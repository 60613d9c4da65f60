"""Continuing a killed training run: the state beside the checkpoint, saved all or nothing.

Every ``save_steps`` optimizer steps the trainer writes ``OUT/checkpoint-last``:
the PRM (``PRM.save_pretrained``) and ``trainer_state.pt`` (optimizer and
scheduler state, the step, the losses and evaluations so far, torch's RNG).
The folder is written beside the old one and swapped in, so a kill at any
moment leaves a whole resume point.  The data order is a function of the seed,
so the resumed run skips the batches already trained on and goes on with the
same ones an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["RESUME_DIR", "STATE_FILE", "ResumeState", "save_resume_point", "find_resume_point",
           "load_resume_point"]

RESUME_DIR = "checkpoint-last"
STATE_FILE = "trainer_state.pt"


@dataclass
class ResumeState:
    step: int
    epoch: float
    optimizer: dict
    scheduler: dict
    rng: torch.Tensor
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    num_examples: int = 0
    total_steps: int = 0

    def check(self, num_examples: int, total_steps: int) -> None:
        """The resumed run must be the same run: same data size and schedule."""
        if (num_examples, total_steps) != (self.num_examples, self.total_steps):
            raise ValueError(
                f"cannot resume: the saved run had {self.num_examples} training samples and {self.total_steps} "
                f"steps, this one {num_examples} and {total_steps}; resume with the same data and options, or "
                "start a new run in another --out folder")


def save_resume_point(out_dir: str | os.PathLike, prm, optimizer, scheduler, step: int, epoch: float,
                      losses: list[float], eval_history: list[dict], num_examples: int, total_steps: int) -> Path:
    out = Path(out_dir)
    tmp, final, old = out / f".{RESUME_DIR}.tmp-{os.getpid()}", out / RESUME_DIR, out / f".{RESUME_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    prm.save_pretrained(tmp)
    torch.save({"step": step, "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "losses": list(losses), "eval_history": list(eval_history),
                "num_examples": num_examples, "total_steps": total_steps}, tmp / STATE_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume_point(out_dir: str | os.PathLike) -> Path | None:
    """``OUT/checkpoint-last`` when it holds a whole state (or the previous one, if a kill fell in the swap)."""
    out = Path(out_dir)
    for candidate in (out / RESUME_DIR, out / f".{RESUME_DIR}.old"):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_resume_point(path: str | os.PathLike) -> ResumeState:
    data = torch.load(Path(path) / STATE_FILE, weights_only=False)
    return ResumeState(**data)
