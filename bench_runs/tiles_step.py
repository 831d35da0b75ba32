"""One-off experiment (2026-11-29, call 6): run the step benchmark with the attention tiles the tuner found best for
a shape (read from its JSON lines), in place of AttentionBlocks.for_head_dim's defaults for that head dim.

    python bench_runs/tiles_step.py TUNE.jsonl SHAPE_LABEL_PART HEAD_DIM -- <jaxsloth.bench.step arguments>
"""

import json
import sys

from jaxsloth.bench import step
from pallas_kernels import attention

tune_file, shape_part, head_dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
rest = sys.argv[sys.argv.index("--") + 1 :]
best = [json.loads(line) for line in open(tune_file)]
best = [r for r in best if r["kernel"] == "best" and shape_part in r["shape"]][-1]["settings"]
print("tiles:", best, flush=True)
default = attention.AttentionBlocks.for_head_dim


def patched(cls, d, dtype=None, **kw):
    if d == head_dim:
        return attention.AttentionBlocks(**best)
    return default(d, dtype, **kw) if dtype is not None else default(d, **kw)


attention.AttentionBlocks.for_head_dim = classmethod(patched)
step.main(rest)
