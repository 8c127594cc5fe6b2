#!/usr/bin/env bash
# The wheels bench/gpu.py needs on a lent GPU machine (no network there; its image has torch 2.11, tokenizers,
# safetensors, pyarrow, psutil, numpy, pyyaml, accelerate, but not omegaconf, and transformers 5.17 with
# huggingface_hub 1.x where this project needs transformers >= 5.23). Run once here, in the repo root; then name
# .whl in the run's `carry` (bench/gpu.py's docstring has the whole call). Python 3.12 x86-64 wheels, exact versions
# (those of the project's venv), no dependencies resolved: each one needed is named (accelerate too: the image's 1.15
# was built against huggingface_hub 1.x, and transformers imports it). About 19 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
git check-ignore -q .whl/x.whl || { echo ".whl/ must be ignored (.gitignore has /.whl/)" >&2; exit 1; }
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  omegaconf==2.4.0 transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 \
  kernels==0.19.1 tomlkit==0.15.3 idna==3.21 anyio==4.16.0 h11==0.16.0 click==8.5.1 regex==2026.12.2 accelerate==1.16.0 \
  typing_extensions==4.16.0
du -sh .whl
