"""Continuing a killed training run: the state beside the checkpoint, saved all or nothing.

Every ``save_steps`` optimizer steps the trainer writes ``OUT/checkpoint-last``:
the PRM (``PRM.save_pretrained``) and ``trainer_state.pt`` (optimizer and
scheduler state, the step, the losses and evaluations so far, torch's RNG, and
the options that shape the run).  The folder is written beside the old one and
swapped in, so a kill at any moment leaves a whole resume point.  The data
order is a function of the seed, so the resumed run skips the batches already
trained on and goes on with the same ones an uninterrupted run would have
seen; a resume with other options (learning rate, seed, batch size, ...) would
not be that continuation, and is refused, naming them.

``trainer_state.pt`` holds tensors and plain data only and is read with
``torch.load(weights_only=True)``: a file that holds anything else (a pickled
object, code) is refused, never run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmprm_infer.io.files import remove_stale_temps, temp_name

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
    options: dict | None = None  # {option as the user names it: value} (None: a state saved before they were kept)

    def check(self, num_examples: int, total_steps: int, options: dict | None = None) -> None:
        """The resumed run must be the same run: same data size, schedule and options."""
        if (num_examples, total_steps) != (self.num_examples, self.total_steps):
            raise ValueError(
                f"cannot resume: the saved run had {self.num_examples} training samples and {self.total_steps} "
                f"steps, this one {num_examples} and {total_steps}; resume with the same data and options, or "
                "start a new run in another --output-dir folder")
        if options is None or self.options is None:
            return
        changed = [f"{name} {options.get(name)!r} (the saved run used {saved!r})"
                   for name, saved in self.options.items() if options.get(name, saved) != saved]
        if changed:
            raise ValueError(
                f"cannot resume: {', '.join(changed)}; a resumed run continues the saved one exactly only with its "
                "own options: resume with those, or start a new run in another --output-dir folder")


def save_resume_point(out_dir: str | os.PathLike, prm, optimizer, scheduler, step: int, epoch: float,
                      losses: list[float], eval_history: list[dict], num_examples: int, total_steps: int,
                      options: dict | None = None) -> Path:
    out = Path(out_dir)
    final = out / RESUME_DIR
    remove_stale_temps(final.resolve(), remove=lambda p: shutil.rmtree(p))  # a killed run's half-written one
    tmp, old = temp_name(final.resolve()), out / f".{RESUME_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    prm.save_pretrained(tmp)
    torch.save({"step": step, "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "losses": list(losses), "eval_history": list(eval_history),
                "num_examples": num_examples, "total_steps": total_steps, "options": options}, tmp / STATE_FILE)
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
    """The state in ``path``; ValueError naming the file when it is damaged or holds anything but tensors and
    plain data (weights_only: nothing in it runs)."""
    file = Path(path) / STATE_FILE

    def unreadable(why: str) -> ValueError:
        return ValueError(f"cannot resume from {file}: {why}; delete {path} to start over, or train into another "
                          "--output-dir folder")

    try:
        data = torch.load(file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError (a foreign object), EOFError/RuntimeError (damage)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = next((line for line in lines if "Unsupported" in line or "not allowed" in line), lines[0] if lines
                     else "")
        raise unreadable(f"it is damaged or holds more than tensors and plain data ({type(exc).__name__}: "
                         f"{cause[:200]})") from None
    if not isinstance(data, dict):
        raise unreadable(f"it holds a {type(data).__name__}, not a resume state")
    try:
        return ResumeState(**data)
    except TypeError as exc:
        raise unreadable(f"it is not a resume state of this version ({exc})") from None
