#!/usr/bin/env bash
# Run here (with the package registry) before a GPU session: fills the git-ignored .whl/ with what the
# offline GPU machine lacks (Python 3.12, x86_64; it has torch, pytest, hypothesis, transformers... but not
# deepspeed or webdataset): deepspeed and webdataset with their needs, and hypothesis with its own (which the
# suite needs wherever the image lacks it). Self-contained: nothing outside the repository is read.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .whl \
  webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection \
  hypothesis sortedcontainers attrs
# deepspeed ships as a source archive that builds into a pure-Python wheel
python3 -m pip wheel -q --no-deps -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
# one version of each package: two stop the offline install (pip refuses duplicate targets)
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr '[:upper:]' '[:lower:]' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels: more than one wheel of: $dupes (remove the older from .whl/)" >&2
  exit 1
fi
touch .whl/.complete
ls .whl
du -sh .whl
