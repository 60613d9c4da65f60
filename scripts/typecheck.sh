#!/usr/bin/env bash
# mypy on the whole mmprm_infer namespace ([tool.mypy] in pyproject.toml); run from anywhere with the venv active,
# extra arguments go to mypy.  package-dir maps kernels/, train/ and integrations/ into mmprm_infer, and mypy cannot
# follow the editable install's import hook, so it reads build/mypy-src: links laid out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/mypy-src/mmprm_infer
rm -rf build/mypy-src
mkdir -p "$tree"
ln -s "$PWD"/mmprm_infer/* "$tree/"
for sub in kernels train integrations; do ln -s "$PWD/$sub" "$tree/$sub"; done
MYPYPATH=build/mypy-src python -m mypy -p mmprm_infer "$@"
