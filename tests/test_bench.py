"""`jaxsloth bench`: subprocess orchestration (jaxsloth's step on CPU with the tiny demo checkpoint), the
longest-sequence search, report tables / ratios / MFU / plots, BENCHMARKS.md regeneration and the comparison
notebook."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.bench import cli, report
from jaxsloth.bench.unsloth_baseline import with_tokenizer
from jaxsloth.models.presets import PRESETS, preset
from jaxsloth.profiles import profile_for_device

ROOT = Path(__file__).parents[1]
DEMO_MODEL = ROOT / "jaxsloth" / "demo_assets" / "model"
RESULTS = ROOT / "notebooks" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_flops_per_token_matches_perf_md_and_brute_force():
    # Llama-3.1-8B at 2048 tokens: about 31.6 GFLOP per token (BENCHMARKS.md's MFU note); counted from the raw shapes.
    d, f, layers, v, heads, kv, hd, t = 4096, 14336, 32, 128256, 32, 8, 128, 2048
    matmul = layers * (d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f) + v * d
    attention = layers * 4 * hd * heads * np.mean(np.arange(1, t + 1))
    expected = 4 * matmul + 3 * attention
    assert report.flops_per_token(preset("llama3.1-8b"), t) == pytest.approx(expected, rel=1e-12)
    assert 31.5e9 < expected < 31.7e9
    for seq, window in ((100, 7), (100, 100), (5, 9), (64, 63)):
        brute = np.mean(np.minimum(np.arange(1, seq + 1), window))
        assert report.mean_keys_per_query(seq, window) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("threshold", [4096, 37_000, 65_535, 130_000, 1 << 20])
def test_search_max_context_finds_the_largest_passing_multiple(threshold):
    tried = []

    def passes(seq):
        tried.append(seq)
        return seq <= threshold

    best, fail = cli.search_max_context(passes, start=4096, limit=1 << 20, resolution=1024)
    assert best == threshold // 1024 * 1024
    assert fail == (None if threshold >= 1 << 20 else best + 1024)
    assert len(tried) == len(set(tried)) and all(s % 1024 == 0 for s in tried)


def test_search_max_context_when_nothing_passes_and_bad_arguments():
    assert cli.search_max_context(lambda s: s <= 1000, start=4096, limit=8192, resolution=1024) == (None, 1024)
    assert cli.search_max_context(lambda s: False, start=1024, limit=8192, resolution=1024) == (None, 1024)
    with pytest.raises(ValueError, match="resolution"):
        cli.search_max_context(lambda s: True, start=1000, limit=8192, resolution=1024)


_FAKE_RUNNER = """
import json, sys, time
seq, out, limit = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if seq > 2 * limit:
    time.sleep(60)
if seq > limit:
    sys.exit("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes")
rec = {"system": "fake", "workload": f"m-qlora-b1-s{seq}", "tokens_per_s": 1e6 / seq, "peak_gib": seq / 1e4,
       "gpu": "NVIDIA H200", "date": "2026-11-28", "command": "fake"}
open(out, "a").write(json.dumps(rec) + "\\n")
"""


def _fake_runner(limit):
    def runner(system, model, quant, batch, seq, steps, out):
        return [sys.executable, "-c", _FAKE_RUNNER, str(seq), out, str(limit)]

    return runner


def test_max_context_probes_in_subprocesses_and_reports(tmp_path):
    bench = cli.Bench(tmp_path, timeout_s=60, runner=_fake_runner(limit=13_000), log=lambda m: None)
    summary = bench.max_context("jaxsloth", "llama3.2-1b", "nf4", start=2048, limit=1 << 16, resolution=1024)
    assert summary["max_context"] == 12_288 and summary["first_failing"] == 13_312
    assert summary["workload"] == "llama3.2-1b-qlora-b1-maxctx"
    assert summary["tokens_per_s"] == pytest.approx(1e6 / 12_288)
    failed = [p for p in bench.records if p.get("probe") and not p["tokens_per_s"]]
    assert failed and all(p["oom"] and p["error"].startswith("out of memory") for p in failed)
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len(summary["probes"]) + 1 and lines[-1]["max_context"] == 12_288
    md = report.markdown_report(lines)
    assert "Longest trainable sequence" in md and "12,288" in md and "13,312" in md
    assert "s12288" not in md  # probes are summarised, not tabled
    assert _is_png(report.plot_report(lines, tmp_path)[-1])


def test_timeout_kills_the_run_and_records_a_failure(tmp_path):
    bench = cli.Bench(tmp_path, timeout_s=2, runner=_fake_runner(limit=10), log=lambda m: None)
    rec = bench.measure("jaxsloth", "llama3.2-1b", "nf4", 1, 4096)
    assert rec["timed_out"] and rec["tokens_per_s"] is None and "timed out" in rec["error"]
    assert rec["workload"] == "llama3.2-1b-qlora-b1-s4096"


def test_bench_cli_runs_jaxsloth_step_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = tmp_path / "out"
    argv = ["--model-path", str(DEMO_MODEL), "--systems", "jaxsloth", "--quant", "nf4", "--baseline", "unsloth"]
    argv += ["--batch", "1", "--seq", "32", "--steps", "1", "--timeout", "300", "--out-dir", str(out)]
    from jaxsloth.cli import main as jaxsloth_main

    assert jaxsloth_main(["bench", *argv]) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    have_unsloth = any(r["system"] == "unsloth" for r in records)
    assert [r["system"] for r in records] == ["jaxsloth"] + ["unsloth"] * have_unsloth
    rec = records[0]
    assert rec["workload"] == "model-qlora-b1-s32" and rec["tokens_per_s"] > 0 and np.isfinite(rec["first_loss"])
    from converters.hf import load_config

    assert rec["flops_per_token"] == pytest.approx(report.flops_per_token(load_config(DEMO_MODEL), 32))
    assert rec["bench_command"].startswith("jaxsloth bench --model-path")
    assert str(tmp_path) not in rec["bench_command"]  # no machine's directories in a record
    assert "| jaxsloth | remat=none |" in (out / "report.md").read_text()
    assert _is_png(out / "throughput.png") and _is_png(out / "memory.png")


def _rec(system, tps, peak, **kw):
    return {
        "system": system,
        "workload": "llama3.1-8b-qlora-b2-s2048",
        "tokens_per_s": tps,
        "peak_gib": peak,
        "gpu": "NVIDIA H200",
        "date": "2026-11-28",
        "command": f"python run {system}",
        **kw,
    }


def test_report_tables_ratios_mfu_and_plots(tmp_path):
    records = [
        _rec("hf-peft-bnb", 3000.0, 15.0),
        _rec("unsloth", 10000.0, 7.5, variant='checkpointing="unsloth"'),
        _rec(
            "jaxsloth",
            12000.0,
            6.0,
            remat="full",
            profile="h200",
            kernels={"attention": "pallas"},
            mlp_chunk=4096,
            layer_loop="scan",
        ),  # fmt: skip
        _rec("hf-peft", None, None, error="out of memory: boom"),
        _rec("jaxsloth", 11000.0, 6.0, remat="full", profile="h200", note="ran the old lookup"),
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = report.load_records([path])
    md = report.markdown_report(loaded)
    jax_row = next(line for line in md.splitlines() if line.startswith("| jaxsloth"))
    cells = [c.strip() for c in jax_row.strip("|").split("|")]
    assert cells[:3] == ["jaxsloth", "remat=full; attention=pallas; mlp_chunk=4096", "12,000"]
    mfu = 12000 * report.flops_per_token(preset("llama3.1-8b"), 2048) / 989.4e12
    assert cells[4] == f"{mfu:.1%}"
    # speed / memory vs hf-peft-bnb, then vs unsloth
    assert cells[5:9] == ["4.00x", "0.40x", "1.20x", "0.80x"]
    assert "failed: out of memory: boom" in md
    assert "; note: ran the old lookup" in md  # a record's note reaches its command footnote
    paths = report.write_report(loaded, tmp_path / "rep")
    assert {"report.md", "throughput.png", "memory.png"} <= set(paths)
    assert all(_is_png(p) for name, p in paths.items() if name.endswith(".png"))
    with pytest.raises(ValueError, match="not a JSON line"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{oops\n")
        report.load_records([bad])


def test_xla_flags_are_part_of_the_record_and_its_label(monkeypatch):
    # XLA_FLAGS change what XLA compiles: a measurement taken under them must say so, in its command and its label.
    from jaxsloth.bench.timing import environment

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    plain = environment()
    assert "xla_flags" not in plain and not plain["command"].startswith("XLA_FLAGS")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_dynamic_slice_fusion=true")
    env = environment()
    assert env["xla_flags"] == "--xla_gpu_enable_dynamic_slice_fusion=true"
    assert env["command"].startswith("XLA_FLAGS='--xla_gpu_enable_dynamic_slice_fusion=true' python")
    rec = _rec("jaxsloth", 12000.0, 6.0, remat="dots", profile="h200", xla_flags=env["xla_flags"])
    # A record without a layer_loop field ran the scan, which is off the h200 profile's loop for dots.
    assert report.config_label(rec) == "remat=dots; layers=scan; XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true"
    rec["layer_loop"] = "unrolled"
    assert report.config_label(rec) == "remat=dots; XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true"
    # 8-bit moments and the host embedding are off the profile's defaults, so the label names them.
    lean = _rec("jaxsloth", 10000.0, 6.7, remat="offload", profile="h200", optimizer_state="8bit", embedding="host")
    assert report.config_label(lean) == "remat=offload; optimizer_state=8bit; embedding=host"
    assert report.config_label(dict(lean, optimizer_state="float32", embedding="device")) == "remat=offload"


def test_kernel_table_names_the_tiles_of_a_sweep():
    # A tile sweep measures one kernel in several configurations: without its tiles its rows read as duplicates.
    block = {"block_m": 256, "block_n": 128, "block_k": 64, "num_stages": 3, "fuse_lora_a": True}
    base = {"op": "nf4_matmul", "impl": "mosaic", "shape": "M4096xK4096xN1024xr16", "fwd_ms": 0.2, "block": block}
    swept = dict(base, command="python -m jaxsloth.bench.kernel_nf4_matmul --sweep --impls mosaic")
    plain = dict(base, command="python -m jaxsloth.bench.kernel_nf4_matmul --impls mosaic")
    table = report.kernel_table("NVIDIA H200", "nf4_matmul", [swept, plain])
    assert "| mosaic (256x128x64, LoRA A fused) |" in table
    assert "| mosaic |" in table


def test_committed_results_and_benchmarks_md(tmp_path):
    records = report.load_records([RESULTS])
    assert len(records) >= 9
    for r in records:
        assert {"system", "workload", "tokens_per_s", "peak_gib", "gpu", "date", "command"} <= set(r), r
    md = report.markdown_report(records)
    assert "llama3.1-8b-qlora-b2-s2048 on NVIDIA H200" in md and "speed vs hf-peft-bnb" in md
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# Benchmarks\n\nintro\n\n{report.BEGIN}\nold\n{report.END}\n\nmethod notes\n")
    report.update_benchmarks_md(target, RESULTS)
    first = target.read_text()
    assert first.startswith("# Benchmarks\n\nintro\n\n") and first.endswith(f"{report.END}\n\nmethod notes\n")
    assert "old" not in first and "llama3.1-8b-qlora-b2-s2048 on NVIDIA H200" in first
    report.update_benchmarks_md(target, RESULTS)
    assert target.read_text() == first
    created = report.update_benchmarks_md(tmp_path / "new.md", RESULTS).read_text()
    assert created.startswith(report.BEGIN) and created.rstrip().endswith(report.END)


def test_unsloth_checkpoint_dir_gets_a_tokenizer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((DEMO_MODEL / "config.json").read_text())
    assert with_tokenizer(DEMO_MODEL, tmp_path / "unused") == DEMO_MODEL
    work = tmp_path / "work"
    work.mkdir()
    assert with_tokenizer(model, work) == work
    assert (work / "config.json").is_symlink() and (work / "tokenizer.json").is_file()


def test_cli_rejects_bad_values(capsys):
    assert cli.main(["--arch", "llama9-1t", "--out-dir", "/nonexistent/x"]) == 2
    assert "unknown architecture 'llama9-1t'" in capsys.readouterr().err
    assert cli.main(["--quant", "int3"]) == 2
    assert cli.main(["--systems", "deepspeed"]) == 2
    with pytest.raises(ValueError, match="does not run quant"):
        cli.runner_argv("hf-peft", "llama3.2-1b", "nf4", 1, 8, 1, "x")
    # A longest-sequence probe (steps 0) runs one step without warm-up in every system.
    jax_probe = cli.runner_argv("jaxsloth", "llama3.2-1b", "nf4", 1, 8, 0, "x")
    torch_probe = cli.runner_argv("hf-peft-bnb", "llama3.2-1b", "nf4", 1, 8, 0, "x")
    assert jax_probe[-4:] == ["--steps", "0", "--warmup", "0"] and torch_probe[-4:] == ["--steps", "1", "--warmup", "0"]
    assert "--warmup" not in cli.runner_argv("jaxsloth", "llama3.2-1b", "nf4", 1, 8, 10, "x")
    assert set(cli.QUANTS) == set(cli.SYSTEMS) and "llama3.2-1b" in PRESETS


def test_compare_notebook_runs(tmp_path):
    from tests.test_notebooks import run_notebook

    nb = run_notebook(ROOT / "notebooks" / "02_compare_pytorch.ipynb", ROOT / "notebooks")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"{len(report.load_records([RESULTS]))} records from" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # comparison + throughput + memory
    assert any("speed vs hf-peft-bnb" in o.get("data", {}).get("text/markdown", "") for o in outputs)


@pytest.mark.gpu
def test_bench_on_gpu_against_hf_qlora(tmp_path):
    records = cli.run_benchmarks(
        ["llama3.2-1b"], systems=["jaxsloth", "hf-peft-bnb"], quants=["nf4"], batch=1, seq=512, steps=2,
        timeout_s=600, out_dir=tmp_path,
    )  # fmt: skip
    # hf-peft-bnb runs with and without prepare_model_for_kbit_training
    assert [r["system"] for r in records] == ["jaxsloth", "hf-peft-bnb", "hf-peft-bnb"]
    assert all(r["train_mode"] and r["gradient_checkpointing"] for r in records[1:]), records
    assert all(r["tokens_per_s"] > 0 and r["peak_gib"] > 0 for r in records), records
    assert report.mfu(records[0]) > 0


def test_memory_vs_length_plot(tmp_path):
    records = [
        {"system": "jaxsloth", "workload": "llama3.1-8b-qlora-b1-s131072", "peak_gib": 21.6},
        {"system": "jaxsloth", "workload": "llama3.1-8b-qlora-b2-s2048", "peak_gib": 8.8},
    ]
    path = report.plot_memory_vs_length(records, tmp_path / "mem.png")
    assert path.stat().st_size > 10_000


def test_step_with_the_embedding_on_the_host_plans_less_device_memory(tmp_path):
    # --embedding host: the table leaves the step's arguments; the record names the setting.
    from jaxsloth.bench import step

    out = tmp_path / "plan.jsonl"
    common = ["--model-path", str(DEMO_MODEL), "--quant", "nf4", "--batch", "1", "--seq", "16", "--out", str(out)]
    step.main([*common, "--compile-only"])
    step.main([*common, "--compile-only", "--embedding", "host"])
    device, host = (json.loads(line) for line in out.read_text().splitlines())
    assert device["embedding"] == "device" and host["embedding"] == "host"
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    e = 4  # the CPU profile computes in float32
    saved = (device["compiled_argument_gib"] - host["compiled_argument_gib"]) * 2**30
    assert saved == pytest.approx((cfg["vocab_size"] - 16) * cfg["hidden_size"] * e, abs=512)  # XLA aligns buffers
    assert host["model_estimate"]["host_fixed_gib"] * 2**30 == cfg["vocab_size"] * cfg["hidden_size"] * e


def test_step_compile_only_reports_xla_memory_plan(tmp_path):
    # --compile-only: XLA's plan for lengths too slow to run; it must agree with what the step really holds.
    from jaxsloth.bench import step

    out = tmp_path / "plan.jsonl"
    common = ["--model-path", str(DEMO_MODEL), "--quant", "nf4", "--batch", "1", "--seq", "64", "--out", str(out)]
    step.main([*common, "--compile-only", "--long-context", "--remat-group", "2"])
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["compile_only"] and rec["remat"] == "offload" and rec["remat_group"] == 2
    assert rec["compiled_argument_gib"] > 0 and rec["compiled_temp_gib"] > 0
    assert rec["compiled_device_gib"] == pytest.approx(rec["compiled_argument_gib"] + rec["compiled_temp_gib"])
    assert rec["model_estimate"]["device_gib"] > 0 and "tokens_per_s" not in rec


def test_step_trace_summarizes_where_device_time_goes(tmp_path):
    # --trace profiles two more steps and sums kernel time per category; on CPU every track counts.
    from jaxsloth.bench import step, trace_summary

    out, trace_dir = tmp_path / "step.jsonl", tmp_path / "trace"
    step.main(
        ["--model-path", str(DEMO_MODEL), "--quant", "bf16", "--batch", "1", "--seq", "32", "--steps", "1"]
        + ["--warmup", "0", "--trace", str(trace_dir), "--out", str(out)]
    )
    rec = json.loads(out.read_text().splitlines()[0])
    summary = json.loads((trace_dir / "summary.json").read_text())
    assert summary["steps"] == step.TRACED_STEPS and summary["kernel_ms_per_step"] > 0
    assert rec["trace_by_category_ms"] == summary["by_category_ms"]
    assert {k: rec[k] for k in step.TRACE_TIMES} == {k: summary[k] for k in step.TRACE_TIMES}
    assert 0 <= summary["copy_hidden_ms_per_step"] <= summary["copy_ms_per_step"]
    assert summary["compute_busy_ms_per_step"] <= summary["busy_ms_per_step"] <= summary["span_ms_per_step"] + 1e-3
    assert sum(summary["by_category_ms"].values()) == pytest.approx(summary["kernel_ms_per_step"], rel=1e-3, abs=1e-3)
    assert summary["top_kernels"] and all(k["ms"] >= 0 for k in summary["top_kernels"])
    # The same summary from the command line, and a clear error where no trace was recorded.
    assert trace_summary.summarize(trace_summary.find_trace(trace_dir), steps=2, top=40) == summary
    with pytest.raises(FileNotFoundError, match="perfetto"):
        trace_summary.find_trace(tmp_path / "nothing")


def test_trace_categories_on_gpu_kernel_names(tmp_path):
    # A hand-made GPU trace in the Chrome-trace format JAX writes: only the device's tracks count.
    import gzip

    from jaxsloth.bench import trace_summary

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "ts": 0, "dur": 3000},
        {
            "ph": "X",
            "pid": 1,
            "tid": 1,
            "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
            "ts": 3000,
            "dur": 1000,
        },
        {"ph": "X", "pid": 1, "tid": 1, "name": "rms_norm_fwd", "ts": 4000, "dur": 500},
        {"ph": "X", "pid": 1, "tid": 1, "name": "flash_dkv_mgpu", "ts": 5000, "dur": 1000},  # a Mosaic GPU kernel
        {"ph": "X", "pid": 1, "tid": 2, "name": "loop_multiply_fusion_3", "ts": 4500, "dur": 500},
        {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 9000},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary.summarize(path, steps=1)
    assert s["kernel_ms_per_step"] == pytest.approx(6.0) and s["span_ms_per_step"] == pytest.approx(6.0)
    assert s["by_category_ms"] == {
        "GEMM (cuBLAS/cuBLASLt)": 3.0,
        "attention (cuDNN)": 1.0,
        "attention (Pallas)": 1.0,
        "Pallas: norm / rope / glu / loss / nf4": 0.5,
        "XLA fusions (elementwise, dequantize, optimizer)": 0.5,
    }


def test_trace_summary_measures_how_much_copy_time_compute_hides():
    # Two compute kernels on one stream (0-4 ms, 6-8 ms) and offload copies on another: one wholly under a kernel,
    # one half under, one in the idle gap. Hidden = 1 + 1 + 0 ms of the 4 ms of copies; busy = 8 of the 8 ms span.
    from jaxsloth.bench import trace_summary

    events = [
        {"name": "nvjet_gemm", "ts": 0, "dur": 4000, "tid": 1},
        {"name": "loop_add_fusion", "ts": 6000, "dur": 2000, "tid": 1},
        {"name": "MemcpyD2H", "ts": 1000, "dur": 1000, "tid": 2},
        {"name": "MemcpyH2D", "ts": 3000, "dur": 2000, "tid": 2},
        {"name": "MemcpyD2H", "ts": 5000, "dur": 1000, "tid": 2},
    ]
    o = trace_summary.copy_overlap(events)
    assert o == {"copy_us": 4000, "copy_hidden_us": 2000.0, "compute_busy_us": 6000, "busy_us": 8000}


def test_step_attention_blocks_from_json_or_a_tune_file(tmp_path):
    # --attention-blocks: the tuner's best tiles (or a JSON object) in place of the head dim's defaults.
    from jaxsloth.bench import step
    from pallas_kernels.attention import AttentionBlocks

    default = AttentionBlocks.for_head_dim(128)
    assert step.attention_blocks('{"block_q_dq": 64}', default) == dataclasses.replace(default, block_q_dq=64)
    tune = tmp_path / "tune.jsonl"
    rows = [{"kernel": "dq", "settings": {"block_q_dq": 32}}, {"kernel": "best", "settings": {"block_k_dq": 32}}]
    tune.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step.attention_blocks(str(tune), default) == dataclasses.replace(default, block_k_dq=32)
    with pytest.raises(ValueError, match="unknown AttentionBlocks fields"):
        step.attention_blocks('{"block_z": 1}', default)
    with pytest.raises(ValueError, match="neither a file nor a JSON object"):
        step.attention_blocks("nope.jsonl", default)
    # The base is the profile's own tiles: on Hopper the Mosaic ones at d128 in bf16.
    h200 = profile_for_device(name="h200")
    assert step.profile_attention_blocks(h200, 128).fwd_backend == "mosaic"
    assert step.profile_attention_blocks(profile_for_device(name="cpu"), 128) == AttentionBlocks.for_head_dim(
        128, jnp.float32
    )
    out = tmp_path / "step.jsonl"
    step.main(
        ["--model-path", str(DEMO_MODEL), "--quant", "bf16", "--batch", "1", "--seq", "32", "--steps", "1"]
        + ["--warmup", "0", "--op", "attention=pallas", "--attention-blocks", '{"block_q": 32}', "--out", str(out)]
    )
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["attention_blocks"] == {"block_q": 32} and "attention tiles block_q=32" in report.config_label(rec)


def test_records_store_commands_relative_to_the_checkout(tmp_path):
    # A record names no machine's directories: module files become -m, checkout paths relative, others their name.
    from jaxsloth.bench.timing import ROOT, portable_command

    argv = [str(ROOT / "jaxsloth" / "bench" / "step.py"), "--model-path", str(DEMO_MODEL), "--out", "/root/out/s.jsonl"]
    assert portable_command(argv) == (
        "python -m jaxsloth.bench.step --model-path jaxsloth/demo_assets/model --out s.jsonl"
    )
    assert portable_command(["-m", "x", f"--trace={tmp_path}/t"]) == "python -m x --trace=t"


def test_committed_benchmarks_md_is_generated_from_the_results():
    # BENCHMARKS.md's tables are the results files, rendered: regenerate with `jaxsloth bench benchmarks-md`.
    _, committed, _ = report.split_benchmarks_md((ROOT / "BENCHMARKS.md").read_text())
    assert committed == report.benchmarks_section(RESULTS), "run `jaxsloth bench benchmarks-md` and commit the result"
    kernels = report.load_records([RESULTS / "kernels"])
    assert {r["op"] for r in kernels} >= {"attention", "nf4_matmul", "rms_norm", "rope", "swiglu", "cross_entropy"}
    for r in kernels:
        assert {"shape", "date", "command", "device_kind"} <= set(r), r
    for r in report.load_records([RESULTS]) + kernels:  # no record names a machine's directories
        assert not any(p in r["command"] for p in ("/root", "/tmp/", "/work/", "/home/")), r["command"]
