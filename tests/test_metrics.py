"""The metrics sinks write what they should: JSONL lines, TensorBoard scalars, a PNG, a progress bar."""

import json
import math
import struct

import numpy as np
import pytest

from jaxsloth.train.metrics import standard_callbacks


def _records(n: int, seed: int = 0, peak: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for step in range(1, n + 1):
        out.append(
            {
                "step": step,
                "loss": float(3.0 / step + rng.random() * 0.1),
                "grad_norm": float(rng.random() + 0.5),
                "tokens": int(rng.integers(50, 100)),
                "seq_tokens": 128,
                "step_time_s": float(rng.random() * 0.01 + 0.01),
                "tokens_per_s": float(rng.random() * 1000 + 100),
                "peak_gib": float(rng.random()) if peak else None,
                "total_steps": n,
            }
        )
    return out


def _read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Parses the TFRecord event files directly (the tensorboard package is not a dependency)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _feed(callbacks, records):
    try:
        for r in records:
            for cb in callbacks:
                cb(r)
    finally:
        for cb in callbacks:
            cb.close()


def test_files_written(tmp_path):
    records = _records(25)
    _feed(standard_callbacks(tmp_path, progress=False, total_steps=25), records)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records

    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    scalars = _read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"train/loss", "train/grad_norm", "train/tokens_per_s", "train/peak_gib"}
    for name in ("loss", "grad_norm", "tokens_per_s", "peak_gib"):
        steps, values = zip(*scalars[f"train/{name}"])
        assert list(steps) == list(range(1, 26))
        np.testing.assert_allclose(values, [r[name] for r in records], rtol=1e-6)


def test_jsonl_flushed_each_step_and_nonfinite_loss(tmp_path):
    records = _records(3, peak=False)
    records[1]["loss"] = math.nan
    records[1]["skipped"] = True
    cbs = standard_callbacks(tmp_path, progress=False, total_steps=3)
    for cb in cbs:
        cb(records[0])
    # Readable before close: a crash later loses nothing already logged.
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == records[0]
    _feed(cbs, records[1:])
    back = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(back[1]["loss"]) and back[1]["skipped"] and back[2] == records[2]
    assert (tmp_path / "loss.png").exists()  # the NaN point is left out of the plot, not fatal


def test_no_out_dir_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert standard_callbacks(None, progress=False, total_steps=5) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("peak", [True, False])
def test_progress_bar_shows_loss_speed_memory_eta(capsys, peak):
    records = _records(4, peak=peak)
    (bar,) = standard_callbacks(None, progress=True, total_steps=8)
    bar.bar.mininterval = 0  # draw every update so the test sees the postfix
    _feed([bar], records)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/8" in last and f"loss={records[-1]['loss']:.4g}" in last and "tok/s=" in last
    assert ("mem=" in last) == peak
    assert "<" in last  # tqdm's elapsed<remaining (the ETA)


def test_resumed_run_starts_bar_at_its_step(capsys):
    (bar,) = standard_callbacks(None, progress=True, total_steps=10)
    _feed([bar], _records(10)[6:])
    assert bar.bar.n == 10


def test_resume_drops_later_steps_repairs_a_torn_line_and_plots_the_whole_run(tmp_path):
    """A run killed after step 5 (its last line half-written), resumed from the checkpoint of step 3: the log holds
    steps 1..6 once each, nothing glued onto the torn line, and loss.png covers steps 1..6."""
    records = _records(6)
    first = standard_callbacks(tmp_path, progress=False, total_steps=6)
    for r in records[:5]:
        for cb in first:
            cb(r)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # the kill: half of step 6's line
        f.write(json.dumps(records[5])[:20])
    second = standard_callbacks(tmp_path, progress=False, total_steps=6)
    for cb in second:
        cb.resume(3)
    plot = second[-1]
    _feed(second, records[3:])
    back = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert back == records
    assert plot.steps == [1, 2, 3, 4, 5, 6]
    # TensorBoard: the resumed writer marks steps after 3 as superseded (purge_step), then logs 4..6.
    from tensorboardX.proto.event_pb2 import Event

    starts = []
    for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log"):
                starts.append(event.step)
    assert starts == [4]


def test_jsonl_torn_line_repaired_on_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    (writer,) = [cb for cb in standard_callbacks(tmp_path, progress=False, total_steps=3) if hasattr(cb, "file")]
    writer({"step": 2, "loss": 1.5})
    writer.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
    ]


def test_tensorboard_events_reach_the_file_before_close(tmp_path):
    """A killed run (no close) still leaves its curve."""
    cbs = standard_callbacks(tmp_path, progress=False, total_steps=3)
    for cb in cbs:
        cb(_records(1)[0])
    assert _read_scalars(tmp_path / "tensorboard")["train/loss"][0][0] == 1
    for cb in cbs:
        cb.close()


def test_a_failing_close_neither_hides_nor_skips(tmp_path, caplog):
    from jaxsloth.train.metrics import close_all

    closed = []

    class Broken:
        def close(self):
            raise OSError(28, "No space left on device")

    class Fine:
        def close(self):
            closed.append(1)

    errors = close_all([Broken(), Fine()])
    assert closed == [1] and len(errors) == 1 and errors[0].errno == 28
    assert any("could not close Broken" in r.getMessage() for r in caplog.records)
