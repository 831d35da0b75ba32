#!/usr/bin/env bash
# Installs tokamax on a GPU machine without network, for kernel_attention's tokamax_* rows, from the wheels
# fetch_baseline_wheels.sh put in .whl/tokamax plus pydantic's set from .whl/:
#   bash jaxsloth/bench/suites/install_tokamax_wheels.sh [SITE] && export PYTHONPATH=SITE:$PWD   (SITE: /tmp/site)
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}
SITE=${1:-/tmp/site}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/tokamax/*.whl \
  .whl/pydantic-2*.whl .whl/pydantic_core-*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl
# tokamax's import reaches xprof (a 32 MB profiler UI) for a timing method the benchmark doesn't use: empty modules.
mkdir -p "$SITE/xprof/cli/tools"
touch "$SITE"/xprof/__init__.py "$SITE"/xprof/cli/__init__.py "$SITE"/xprof/cli/tools/{__init__,get_kernel_stats_tool}.py
PYTHONPATH="$SITE:${PYTHONPATH:-}" "$PY" -c "import tokamax; print('tokamax', tokamax.__version__)"
