#!/usr/bin/env bash
# Run here (with the package registry) before a GPU session: fills .whl/ with what the offline GPU machine
# lacks. ../shared/gpu/wheels.sh brings deepspeed and webdataset; the test suite also needs hypothesis.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p "$(git rev-parse --git-dir)/info"  # the shared script appends to info/exclude
bash ../shared/gpu/wheels.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d .whl hypothesis sortedcontainers attrs
ls .whl
