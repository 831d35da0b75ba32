"""The entry points of jaxsloth/bench/suites/moe_kernels_h200.sh on CPU with tiny shapes (interpret mode): the grouped
matmul micro-benchmark (its records and errors against ragged_dot) and the MoE QLoRA step on the Pallas grouped
matmul with tiles from --grouped-matmul-blocks (the suite runs the same code at Qwen3-30B-A3B's sizes)."""

import json

import numpy as np

from tests.moe_models import saved_moe_model


def test_kernel_bench_records_tiled_and_pallas(tmp_path):
    from jaxsloth.bench import kernel_grouped_matmul

    out = tmp_path / "gmm.jsonl"
    kernel_grouped_matmul.main(["--smoke", "--projections", "down", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["tiled", "pallas", "pallas"]
    for r in rows:
        assert "error" not in r and r["shape"].startswith("down ")
        assert r["max_err"] < 1e-4 and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    # The second tiles change only the launch order: their dw kernel is the first's, so it is not timed again.
    assert rows[0]["fwd_dx_dw_ms"] > 0 and rows[1]["fwd_dx_dw_ms"] > 0 and rows[2]["fwd_dx_dw_ms"] is None
    assert rows[1]["block"]["block_m"] == 16 and rows[2]["block"]["n_fastest"]


def test_kernel_bench_group_sizes_are_skewed_and_sum_to_the_rows():
    from jaxsloth.bench.kernel_grouped_matmul import group_sizes

    sizes = group_sizes(4096, 128, 8)
    assert sizes.sum() == 4096 * 8 and sizes.max() > 2 * sizes.mean() > 4 * sizes.min()


def test_step_runs_moe_qlora_on_the_pallas_grouped_matmul(tmp_path):
    from jaxsloth.bench import step

    out = tmp_path / "step.jsonl"
    blocks = {"block_m": 16, "block_n": 16, "block_k": 16}
    step.main(["--model-path", str(saved_moe_model("qwen3_moe")), "--quant", "nf4", "--batch", "1", "--seq", "16"] + [
        "--steps", "1", "--warmup", "0", "--grouped-matmul", "pallas", "--grouped-matmul-blocks", json.dumps(blocks),
        "--out", str(out),
    ])  # fmt: skip
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["kernels"]["grouped_matmul"] == "pallas" and rec["grouped_matmul_blocks"] == blocks
    assert rec["tokens_per_s"] > 0 and np.isfinite(rec["first_loss"])
