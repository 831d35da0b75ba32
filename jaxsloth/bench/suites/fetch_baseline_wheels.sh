#!/usr/bin/env bash
# Downloads into .whl/ (on a machine with network) the wheels that the baselines need on a GPU machine without
# network: bitsandbytes for HF + PEFT QLoRA, Unsloth with what it imports, and tokamax for the attention table.
# Unsloth's wheel carries a 28 MB web UI (studio/), dropped here so everything stays under 64 MiB to copy.
# baselines_h200.sh and attention_h200.sh install them from .whl/ when it is there.
#   PYTHON=python3.12 bash jaxsloth/bench/suites/fetch_baseline_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}
grep -qx "/.whl/" .gitignore || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
for spec in bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 torchao==0.18.0 \
  cut_cross_entropy==25.1.1 datasets==4.8.5 tyro msgspec hf_transfer json5 structlog nest-asyncio pydantic==2.14.4 \
  pydantic-core annotated-types typing-inspection docstring-parser shtab typeguard multiprocess dill; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec"
done
# Unsloth without its web UI: drop studio/ from the archive and from RECORD.
w=$(ls .whl/unsloth-2026*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$w" && rm -rf studio && sed -i '/^studio\//d' unsloth-*.dist-info/RECORD \
  && rm "$OLDPWD/$w" && zip -q -r "$OLDPWD/$w" .)
rm -rf "$tmp"
# Google's tokamax for kernel_attention's tokamax_* rows, with what its import needs that the image lacks (pydantic's
# set is above; jaxtyping and wadler_lindig are in the image, carried in case). Not xprof: 32 MB, imported for a
# profiler we don't use, so install_tokamax_wheels.sh stubs it. Its TPU autotuning tables and tests are dropped.
for spec in tokamax==0.0.17 einshape==1.0 immutabledict==4.3.1 qwix==0.1.8 jaxtyping==0.3.11 wadler_lindig==0.1.8; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl/tokamax "$spec"
done
w=$(ls .whl/tokamax/tokamax-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$w" && rm -rf tokamax/data/autotuning/tpu* && find tokamax -name '*_test.py' -delete \
  && sed -i -E '/^tokamax\/data\/autotuning\/tpu|_test\.py,/d' tokamax-*.dist-info/RECORD \
  && rm "$OLDPWD/$w" && zip -q -r "$OLDPWD/$w" .)
rm -rf "$tmp"
du -sh .whl
