#!/usr/bin/env bash
# Wheels of fedmi's dependencies that the device machines' image (Python 3.12, torch, numpy,
# pandas, scikit-learn, typer, rich, safetensors, pyyaml) lacks, into .whl/ for
# benchmarks/device_check.sh. Run here, where the package registry can be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" "monai==1.6.1" "typing-extensions==4.16.0"
ls -l .whl
