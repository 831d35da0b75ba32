#!/usr/bin/env bash
# Sixth session, call D: the Mosaic dK/dV kernel with 128 keys per CTA (each compute warpgroup dK and dV of its
# own 64: no recomputed scores, head dims <= 128). GPU tests of every Mosaic case first, then the 8B shape's dK/dV
# tiles (Triton best against both Mosaic layouts) at T = 8192 with forward+backward on the winner, cuDNN beside it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
timeout 200 python3 -m pytest -q -m gpu tests/test_kernel_attention.py -k mosaic > $L/pytest.txt 2>&1; el pytest
tail -4 $L/pytest.txt; grep -E "^FAILED|Error" $L/pytest.txt | head -5 | cut -c1-300
timeout 150 python3 -m jaxsloth.bench.kernel_attention --tune --only "llama3_8b:B=1,T=8192" --kernels dkv dkv_mosaic --out $L/tune_8b.jsonl > $L/tune_8b.log 2>&1; el tune_8b
timeout 60 python3 -m jaxsloth.bench.kernel_attention --only "llama3_8b:B=1,T=8192" --out $L/attn_8b.jsonl > $L/attn_8b.log 2>&1; el attn_8b
python3 - $L/tune_8b.jsonl $L/attn_8b.jsonl <<'PY'
import json, sys
for f in sys.argv[1:]:
    for line in open(f):
        r = json.loads(line)
        st = r.get("settings") or r.get("blocks") or {}
        print(r.get("kernel", r.get("impl")), st.get("dkv_backend"), st.get("block_q_dkv"), st.get("block_k_dkv"), st.get("num_stages_dkv"), r.get("ms"), r.get("fwd_ms"), r.get("fwd_bwd_ms"), r.get("max_err"), r.get("error", "")[:150])
PY
cat $L/times.txt
tar czf $OUT/s6d.tgz -C $OUT logs && rm -rf $OUT/logs
