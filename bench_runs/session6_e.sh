#!/usr/bin/env bash
# Sixth session, call E: the Mosaic forward (pallas_kernels/attention_mgpu.forward) and the 128-key Mosaic dK/dV as
# the d128 16-bit default. GPU tests of every Mosaic case, then the forward's tiles against the Triton forward's at
# the 8B and Gemma-2 shapes, T = 8192 (each tune ends with forward+backward on its best tiles), then the 8B shape
# with the defaults beside cuDNN and XLA in the same call.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 200 python3 -m pytest -q -m gpu tests/test_kernel_attention.py -k "mosaic or default" > $L/pytest.txt 2>&1; el pytest
tail -3 $L/pytest.txt; grep -E "^FAILED" $L/pytest.txt | head -8 | cut -c1-200
for s in "llama3_8b:B=1,T=8192" "gemma2_9b:B=1,T=8192"; do
  timeout 80 python3 -m jaxsloth.bench.kernel_attention --tune --only "$s" --kernels fwd fwd_mosaic --out $L/tune_fwd.jsonl >> $L/tune_fwd.log 2>&1; el "tune $s"
done
timeout 60 python3 -m jaxsloth.bench.kernel_attention --only "llama3_8b:B=1,T=8192" --out $L/attn_8b.jsonl > $L/attn_8b.log 2>&1; el attn_8b
python3 - $L/tune_fwd.jsonl $L/attn_8b.jsonl <<'PY'
import json, sys
for f in sys.argv[1:]:
    for line in open(f):
        r = json.loads(line)
        st = r.get("settings") or r.get("blocks") or {}
        print(r.get("kernel", r.get("impl")), r["shape"][:22], st.get("fwd_backend"), st.get("block_q"), st.get("block_k"), st.get("num_stages"), r.get("ms"), r.get("fwd_ms"), r.get("fwd_bwd_ms"), r.get("max_err"), r.get("error", "")[:150])
PY
cat $L/times.txt
tar czf $OUT/s6e.tgz -C $OUT logs && rm -rf $OUT/logs
