"""Deterministic kills for the resume tests: the run is provably mid-way when it is killed.

``python tests/kill_gate.py GATE_DIR K annotate ARGS...`` runs ``mmprm
annotate ARGS...`` with the process that writes the tree files (the driver
under ``--ray``) stopped right after its K-th tree file: it creates
``GATE_DIR/blocked`` and waits there until ``GATE_DIR/release`` appears, then
exits.  So a test that waits for ``blocked`` and kills the run finds exactly K
finished trees, whatever the machine's speed -- no sleeps, no timing windows.

``claim`` gives out turn numbers across processes (exclusive file creation),
for gates inside Ray actors (tests/test_ray.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BLOCKED = "blocked"
RELEASE = "release"


def claim(gate_dir: str | os.PathLike) -> int:
    """The next free turn number, claimed atomically (exclusive file creation)."""
    i = 0
    while True:
        try:
            fd = os.open(os.path.join(gate_dir, f"turn-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            i += 1
            continue
        os.close(fd)
        return i


def block(gate_dir: str | os.PathLike, name: str = BLOCKED) -> None:
    """Say so (the file ``GATE_DIR/name``), wait for ``release``, then end the process."""
    Path(gate_dir, name).touch()
    while not Path(gate_dir, RELEASE).exists():
        time.sleep(0.05)
    os._exit(3)


def install(gate_dir: str, trees: int) -> None:
    """Stop this process after it has written ``trees`` tree files (train.mcts and ray_annotate write
    them through ``write_json_atomic``)."""
    from mmprm_infer.integrations import ray_annotate
    from mmprm_infer.train import mcts

    written = []

    def wrap(write):
        def gated_write(path, *args, **kwargs):
            result = write(path, *args, **kwargs)
            if Path(path).parent.name == "trees":
                written.append(path)
                if len(written) == trees:
                    block(gate_dir)
            return result
        return gated_write

    mcts.write_json_atomic = wrap(mcts.write_json_atomic)
    ray_annotate.write_json_atomic = wrap(ray_annotate.write_json_atomic)


def command(gate_dir, trees: int, *argv: str) -> list[str]:
    """The command line that runs ``mmprm ARGV`` stopping after ``trees`` tree files."""
    return [sys.executable, os.path.abspath(__file__), str(gate_dir), str(trees), *argv]


def wait_until_blocked(proc, gate_dir, hang_guard_s: float = 300.0) -> None:
    """Wait until the gated run has stopped at its gate.

    ``hang_guard_s`` only turns a hang into a failure; how fast the run gets there does not matter."""
    deadline = time.monotonic() + hang_guard_s
    while not Path(gate_dir, BLOCKED).exists():
        if proc.poll() is not None:
            raise AssertionError(f"the gated run exited before its gate (code {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError("the gated run hung before its gate")
        time.sleep(0.02)


def release(gate_dir) -> None:
    """Let blocked processes that outlived the kill exit."""
    Path(gate_dir, RELEASE).touch()


if __name__ == "__main__":
    gate, n_trees, *rest = sys.argv[1:]
    install(gate, int(n_trees))
    from mmprm_infer.cli import main

    sys.exit(main(rest))
