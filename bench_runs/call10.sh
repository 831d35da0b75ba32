#!/usr/bin/env bash
# Session 4, call 4: Unsloth's 8B QLoRA again, now recording how many Linear4bit modules it loaded (call 3 measured
# 14,956 tok/s at 21.0 GiB where PERF.md has 10,276 at 7.0: was it 4-bit?), beside HF + PEFT + bitsandbytes and the
# jaxsloth profile step in the same call; then the loss GPU tests call 2 cut short.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
L=$OUT/logs; mkdir -p $L; R=$L/step.jsonl
t0=$(date +%s); el(){ echo "$1 $(( $(date +%s) - t0 ))s" >> $L/times.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > $L/pip.log 2>&1; el pip
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 -m jaxsloth.bench.unsloth_baseline --arch llama3.1-8b --quant nf4 --steps 3 --warmup 1 --out $R > $L/unsloth.log 2>&1; el unsloth
python3 -c "import torch; print(torch.cuda.memory_allocated())" >> $L/times.txt
timeout 45 python3 -m jaxsloth.bench.step --batch 2 --seq 2048 --profile h200 --steps 3 --warmup 1 --out $R --arch llama3.1-8b --quant nf4 >> $L/run.log 2>&1; el 8b
PYTHONPATH=/tmp/site:$PWD timeout 130 python3 -m jaxsloth.bench.torch_baseline --arch llama3.1-8b --system hf-peft-bnb --steps 3 --warmup 1 --out $R >> $L/run.log 2>&1; el hf_bnb
timeout 60 python3 -m pytest -q -m gpu tests/test_kernel_cross_entropy.py -k "llama_vocab or frozen" > $L/pytest.log 2>&1; el pytest_ce
