#!/usr/bin/env bash
# Fifth session, call E (the last device minutes): the 8B QLoRA default (attn_dots, unrolled) with its first k layers
# under "dots" (--dots-layers k), for the fastest step at or under HF + PEFT + bitsandbytes' 15.7 GiB. Measured
# peaks so far: attn_dots 11.5 GiB, dots 18.8 (call 5), so k = 16 should land near 15.2 and k = 18 near 15.6.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
S="python3 -m jaxsloth.bench.step --arch llama3.1-8b --quant nf4 --batch 2 --seq 2048 --profile h200 --steps 5 --warmup 1 --out $R"
timeout 85 $S --dots-layers 16 >> $L/run.log 2>&1; el k16
timeout 85 $S --dots-layers 18 >> $L/run.log 2>&1; el k18
tar czf $OUT/s5e.tgz -C $OUT logs && rm -rf $OUT/logs
