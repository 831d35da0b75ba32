# Sourced by every suite. Takes --tree DIR (the checkout whose code runs; default: this repository) and --out DIR
# (where records and logs go; default: $OUT when set, else ./bench-out) from the arguments
# and leaves the rest in ARGS. Then: cd to the tree, PYTHONPATH on it (and on $SITE, where carried wheels went),
# and `timed NAME SECONDS COMMAND...`, which runs one measurement under a time limit with its log in OUT/logs.
TREE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
OUTDIR=${OUT:-$PWD/bench-out}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tree) TREE=$(cd "$2" && pwd); shift 2 ;;
    --out) mkdir -p "$2"; OUTDIR=$(cd "$2" && pwd); shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
mkdir -p "$OUTDIR/logs"
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$SITE:$TREE" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
cd "$TREE"
T0=$(date +%s)

timed() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" >> "$OUTDIR/logs/$name.log" 2>&1
  echo "$name: exit $?, $(( $(date +%s) - T0 )) s" | tee -a "$OUTDIR/logs/times.txt"
}
