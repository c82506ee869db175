"""Seconds-long smoke run of the benchmarks (bench/): the CLI's smoke suite and a tiny training run.

Checks that the table has a row per variant and dtype, the ratios are finite, miss_ext agrees
with miss_ext.reference and PEFT, the CSV carries its metadata, and the training losses of PEFT
and miss_ext agree.
"""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytest.importorskip("peft")

from bench import cli, memory, report, timing  # noqa: E402

VARIANTS = ("standard", "mini", "bat")
ERR = {"float32": 1e-4, "bfloat16": 3e-2}
META = ("torch", "device_name", "threads", "git_commit", "date")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny shapes: one thread is faster and, on a busy CI machine, far steadier.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_layer_smoke_suite(tmp_path, capsys):
    out_csv = tmp_path / "smoke.csv"
    rc = cli.main(["--suite", "smoke", "--threads", "1", "--csv", str(out_csv), "--no-progress", "--png", str(tmp_path / "s.png")])
    assert rc == 0
    text = capsys.readouterr().out
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))

    # One row per variant and dtype, in the table and in the CSV.
    got = {(r["variant"], r["dtype"]) for r in rows}
    assert got == {(v, d) for v in VARIANTS for d in ERR}
    table_rows = [ln.split()[:2] for ln in text.splitlines() if ln.split()[:1] and ln.split()[0] in VARIANTS]
    assert sorted(map(tuple, table_rows)) == sorted(got)

    for r in rows:
        for key in ("peft/floor", "ours/floor", "ours/peft"):
            for ph in timing.PHASES:
                v = float(r[f"{key}_{ph}"])
                assert math.isfinite(v) and v > 0, (r["variant"], r["dtype"], key, ph, v)
        assert float(r["floor_total_ms"]) > 0
        if r["variant"] == "bat":
            assert math.isfinite(float(r["ours/floorW_total"]))
        tol = ERR[r["dtype"]]
        assert float(r["err_ref"]) < tol, (r["variant"], r["dtype"], r["err_ref"])
        assert float(r["err_peft"]) < tol, (r["variant"], r["dtype"], r["err_peft"])
        # docs/MATH.md section 8: nothing weight-sized is kept for backward.
        assert float(r["ours_extra_saved_frac_w"]) < 0.5, (r["variant"], r["dtype"])
        for k in META:
            assert r[k] != "", k
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "s.png").stat().st_size > 0


def test_train_smoke():
    from bench.train_bench import TrainConfig, run_train_suite

    cfg = TrainConfig(layers=1, hidden=64, intermediate=128, heads=2, vocab=128, seq=16, batch=2,
                      r=16, mini_r=16, steps=3, warmup=1)
    rows = run_train_suite(cfg, ["all"], list(VARIANTS), [torch.float32], "cpu", progress=False)
    assert len(rows) == 3
    for r in rows:
        assert r["loss_ok"], r
        assert math.isfinite(r["peft_loss"]) and math.isfinite(r["ours_loss"])
        assert r["ours_tokens_per_s"] > 0 and r["peft_tokens_per_s"] > 0
    assert "loss after 3 steps" in report.train_table(rows)


def test_saved_tensors_meter_counts_storages_once():
    w = torch.randn(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with memory.SavedTensorsMeter([x]) as m:
        h = x @ w  # saves w (x needs no saving: w does not require grad)
        y = (h * h).sum()  # saves h (twice: one storage)
    y.backward()
    assert m.saved_bytes == w.nbytes + h.nbytes
    assert m.n_storages == 2


def test_paired_ratio_and_table():
    assert timing.paired_ratio([2.0, 4.0, 100.0], [1.0, 2.0, 50.0]) == 2.0
    t = report.format_table([("g", "a", lambda r: r["a"]), ("h", "bb", lambda r: r["b"])],
                            [{"a": "x", "b": "1.00"}])
    assert t.splitlines()[-1].split() == ["x", "|", "1.00"]
