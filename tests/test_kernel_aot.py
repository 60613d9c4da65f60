"""Ahead-of-time compilation of every Triton launch for sm_80 and sm_90, on a machine without a GPU
(mmprm_infer.kernels.aot): what the CPU interpreter accepts but the CUDA compiler would not fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mmprm_infer.kernels import aot

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _compiled_mode_env() -> dict:
    """The environment without TRITON_INTERPRET: Triton picks its mode at import, so a subprocess."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_recorded_launches_cover_every_kernel_dtype_and_flag():
    launches = aot.record_launches()
    names = {launch.fn.__name__ for launch in launches}
    assert names == {"_prefix_fwd_kernel", "_suffix_fwd_kernel", "_merge_kernel", "_marker_reward_kernel"}
    pointer_types = {sig["Q"] for launch in launches if launch.fn.__name__ == "_prefix_fwd_kernel"
                     for sig in [launch.signature()[0]]}
    assert pointer_types == {"*fp32", "*bf16", "*fp16"}
    suffix_flags = {(launch.kwargs["HAS_INIT"], launch.kwargs["WRITE_LSE"]) for launch in launches
                    if launch.fn.__name__ == "_suffix_fwd_kernel"}
    assert suffix_flags == {(False, True), (True, False)}  # suffix_partial; the fused merge of the attention
    block_d = {launch.kwargs["BLOCK_D"] for launch in launches if launch.fn.__name__ == "_prefix_fwd_kernel"}
    assert block_d == {64, 128, 256}  # head dims 64, 80 (padded), 128, 256
    readouts = [launch for launch in launches if launch.fn.__name__ == "_marker_reward_kernel"]
    assert {launch.signature()[0]["Rows"] for launch in readouts} == {"*fp32", "*bf16", "*fp16"}
    assert {launch.kwargs["BLOCK_D"] for launch in readouts} == {512, 1024}  # hidden 512 and 3584 (chunked)
    assert len({launch.key() for launch in launches}) == len(launches)  # deduplicated


def test_every_launch_compiles_for_sm80_and_sm90():
    # one process per target, side by side: compiling is single-threaded, so two cores halve the wall time
    procs = {capability: subprocess.Popen([sys.executable, "-m", "mmprm_infer.kernels.aot", "--capability",
                                           str(capability)], cwd=REPO, env=_compiled_mode_env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for capability in (80, 90)}
    for capability, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        line = next(x for x in out.splitlines() if x.startswith(f"sm_{capability}:"))
        assert line.endswith(" 0 failed") and int(line.split()[1]) >= 40, line


def test_a_kernel_only_the_interpreter_accepts_fails_the_aot_check():
    import triton
    from aot_bad_kernel import scale_kernel

    if not torch.cuda.is_available():  # the interpreter runs it (a plain Python call inside the kernel)
        x, y = torch.arange(4.0), torch.zeros(4)
        triton.jit(scale_kernel)[(1,)](x, y, 4, BLOCK=16)
        assert y.tolist() == [0.0, 2.0, 4.0, 6.0]
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1])\n"
              "from aot_bad_kernel import scale_kernel\n"
              "from mmprm_infer.kernels.aot import Launch, compile_launch\n"
              "compile_launch(Launch(scale_kernel, (torch.zeros(4), torch.zeros(4), 4), {'BLOCK': 16}), 80)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS)], cwd=REPO, env=_compiled_mode_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Unsupported function referenced" in proc.stderr, proc.stderr[-2000:]
