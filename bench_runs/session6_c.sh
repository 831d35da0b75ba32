#!/usr/bin/env bash
# Sixth session, call C: issue 10's full attention table in one call: Pallas (Mosaic dK/dV at d256), cuDNN (8B
# shape), tokamax 0.0.17's Mosaic GPU and Triton kernels (carried wheels, bench_runs/install_tokamax.sh) and the
# XLA reference, at the 8B and Gemma-2 shapes, T = 2048 (B2) / 8192 / 32768: times, errors, temporaries.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
bash bench_runs/install_tokamax.sh /tmp/site > $L/install.log 2>&1; el install; tail -2 $L/install.log
export PYTHONPATH=/tmp/site:$PWD
timeout 520 python3 -m jaxsloth.bench.kernel_attention --out $L/attn_all.jsonl > $L/attn_all.log 2>&1; el attn_all
python3 - $L/attn_all.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["impl"], r["shape"].split(",Hq")[0], r.get("fwd_ms"), r.get("fwd_bwd_ms"), r.get("max_err"), r.get("temp_bytes_fwd_bwd"), r.get("error", "")[:160])
PY
cat $L/times.txt
tar czf $OUT/s6c.tgz -C $OUT logs && rm -rf $OUT/logs
