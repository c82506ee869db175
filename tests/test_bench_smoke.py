"""Seconds-long smoke run of the benchmarks (bench/): the CLI's smoke suite and tiny training runs.

Checks that the table has a row per variant and dtype, the ratios are finite, miss_ext agrees
with miss_ext.reference and PEFT, the CSV carries its metadata, the training losses of PEFT
and miss_ext agree, and the training table has its frozen and floor rows with every ratio
"x frozen" (time over the frozen model's), for both targets and both autocast modes.
"""

import ast
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
ERR = {"bfloat16+float32": 3e-2, "float32": 1e-4, "bfloat16": 3e-2}
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
    # The configuration users run comes first.
    assert table_rows[0] == ["standard", "bfloat16+float32"]
    assert "err/frozen" in text

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
        # Errors relative to the frozen layer's own; the adapter is about 0.3x the layer, so the
        # output (and BAT's weight) grows little. BAT: docs/MATH.md section 11's contract.
        assert 1.0 < float(r["y_growth"]) < 1.2 and 0 < float(r["peft_err_frozen"]) < math.inf
        limit = 2.5 * max(1.0, float(r["w_growth"])) if r["variant"] == "bat" else 2.5
        assert 0 < float(r["err_frozen"]) <= limit, (r["variant"], r["dtype"], r["err_frozen"])
        # docs/MATH.md section 8: nothing weight-sized is kept for backward.
        assert float(r["ours_extra_saved_frac_w"]) < 0.5, (r["variant"], r["dtype"])
        mixed = "+" in r["dtype"]
        assert (r["base_dtype"], r["block_dtype"]) == ((
            "bfloat16", "float32") if mixed else (r["dtype"], r["dtype"]))
        for k in META:
            assert r[k] != "", k
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "s.png").stat().st_size > 0


TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--vocab", "128",
        "--seq", "16", "--r", "16", "--mini-r", "16", "--train-warmup", "1", "--no-progress"]


def test_train_smoke_float32(tmp_path, capsys):
    """An fp32 model (the old default), PEFT and miss_ext on every linear: the losses agree."""
    rc, rows = cli.run(["train", *TINY, "--batch", "2", "--steps", "3", "--dtypes", "float32", "--targets", "all",
                        "--autocast", "off", "--no-lora", "--no-floor", "--csv", str(tmp_path / "t.csv")])
    assert rc == 0
    miss = {(r["impl"], r["variant"]): r for r in rows if r["impl"] in ("peft", "inject")}
    assert set(miss) == {(i, v) for i in ("peft", "inject") for v in VARIANTS} | {("inject", "bat-promote")}
    for r in miss.values():
        assert r["loss_ok"], r
        assert r["dtype"] == r["block_dtype"] == "float32"
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert "loss after 3 steps" in capsys.readouterr().out


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


def test_dtype_specs():
    from bench import cases as K

    bf, f32 = torch.bfloat16, torch.float32
    assert K.parse_dtypes(["bf16+fp32", "bfloat16+float32", "float32", "fp16+float32", "bf16+bf16"]) == [
        K.DtypeSpec(bf, f32), K.DtypeSpec(f32, f32), K.DtypeSpec(torch.float16, f32), K.DtypeSpec(bf, bf)]
    spec = K.parse_dtype_spec("BF16+FP32")
    assert spec.mixed and spec.name == "bfloat16+float32"
    assert K.parse_dtype_spec("bf16+bf16").name == "bfloat16"
    cases, _ = K.build_cases([K.Shape(8, 16, 16, 4, 4)], [spec], ["standard"])
    assert (cases[0].dtype, cases[0].block, cases[0].dtype_name) == (bf, f32, "bfloat16+float32")
    for bad, why in (("float32+bfloat16", "at least as wide"), ("bf16+", "A or A\\+B"),
                     ("bf16+fp32+fp64", "A or A\\+B"), ("bf16+int8", "unknown dtype")):
        with pytest.raises(ValueError, match=why):
            K.parse_dtype_spec(bad)
    with pytest.raises(SystemExit, match="--dtypes"):
        cli.main(["--dtypes", "float32+float16", "--no-progress"])
    with pytest.raises(SystemExit, match="plain dtypes"):
        cli.main(["train", "--dtypes", "bf16+fp32", "--no-progress"])
    assert K.SUITES["default"].dtypes[0] == "bfloat16+float32"


def test_mixed_setup_blocks_are_fp32():
    """bfloat16+float32: x, dL/dy and the linear in bf16; PEFT's and ours' blocks in fp32."""
    from bench import cases as K, contestants as C

    case = K.build_cases([K.Shape(8, 32, 16, 8, 8)], K.parse_dtypes(["bf16+fp32"]), ["bat"])[0][0]
    setup = C.make_setup(case, "cpu")
    mods = C.build_modules(setup, bat_precision="promote")
    assert setup.x.dtype == setup.grad_out.dtype == setup.base.weight.dtype == torch.bfloat16
    assert mods["peft"].miss_block["default"].dtype == mods["ours"].miss_block["default"].dtype == torch.float32
    assert mods["ours"].bat_precision == "promote"


def test_preset_config_and_rows():
    from bench.train_preset import DEFAULT_PRESET, PRESETS, entries

    args = cli.build_parser().parse_args(["train", "--preset", "metamathqa", "--hidden", "64", "--heads", "2"])
    cfg = cli.train_config(args, PRESETS["metamathqa"])
    # The preset's values, with the flags given on top.
    assert (cfg.hidden, cfg.heads, cfg.intermediate, cfg.seq, cfg.batch, cfg.r, cfg.mini_r) == (64, 2, 2816, 512, 1, 64, 64)
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.autocast) == (1e-4, 0.1, 1.0, False)
    # `python -m bench train` alone: the users' configuration (the issue's harness sizes).
    step = cli.train_config(cli.build_parser().parse_args(["train"]), PRESETS[DEFAULT_PRESET])
    assert DEFAULT_PRESET == "step" and PRESETS["step"].dtype == "bfloat16"
    assert (step.hidden, step.intermediate, step.layers, step.seq, step.batch, step.vocab, step.r, step.mini_r) == (
        1024, 2816, 2, 512, 1, 2000, 64, 64)
    assert (PRESETS["step"].targets, PRESETS["step"].autocast, PRESETS["step"].impls) == (
        "all,qv", "off,on", "peft,inject")
    # AdamW as HF Trainer runs it (fused) in the users' presets; PEFT's MetaMathQA loop runs
    # torch.optim.AdamW's own default; --adamw overrides either.
    assert (step.adamw, cfg.adamw) == ("fused", "plain")
    plain = cli.train_config(cli.build_parser().parse_args(["train", "--adamw", "plain"]), PRESETS["step"])
    assert plain.adamw == "plain" and "adamw=plain" in plain.describe()
    large = PRESETS["large"].config
    assert (large["hidden"], large["intermediate"], large["seq"]) == (2048, 5632, 2048)
    keys = [e.key for e in entries()]
    assert keys == ["frozen/frozen", "peft/standard", "peft/mini", "peft/bat",
                    "inject/standard", "inject/mini", "inject/bat", "inject/bat-promote",
                    "patch/standard", "patch/mini", "patch/bat", "patch/bat-promote", "peft/lora"]
    assert [e.key for e in entries(["bat"], lora=False)] == ["frozen/frozen", "peft/bat", "inject/bat",
                                                            "inject/bat-promote", "patch/bat", "patch/bat-promote"]
    assert [e.key for e in entries(["mini"], lora=False, impls=("inject",), frozen=False)] == ["inject/mini"]
    with pytest.raises(SystemExit, match="train mode"):
        cli.main(["--preset", "metamathqa", "--no-progress"])
    with pytest.raises(SystemExit, match="divisible by --heads"):
        cli.main(["train", "--preset", "metamathqa", "--heads", "3", "--no-progress"])
    for flag, bad in (("--autocast", "maybe"), ("--impls", "lora"), ("--targets", "mlp")):
        with pytest.raises(SystemExit, match=flag):
            cli.main(["train", flag, bad, "--no-progress"])
    # --autocast alone means on; a list chooses.
    parse = cli.build_parser().parse_args
    assert parse(["train", "--autocast"]).autocast == "on"
    assert parse(["train", "--autocast", "off,on"]).autocast == "off,on"


def test_preset_tiny_run(tmp_path, capsys):
    import miss_ext.peft as mp

    out_csv = tmp_path / "preset.csv"
    rc = cli.main(["train", "--preset", "metamathqa", *TINY, "--steps", "3", "--csv", str(out_csv)])
    assert rc == 0
    assert not mp.is_patched()  # the patch was on for the patch rows' steps only
    text = capsys.readouterr().out
    assert "bat/default" in text and "loss after 3 steps" in text
    with open(out_csv) as f:
        rows = {(r["impl"], r["variant"]): r for r in csv.DictReader(f)}
    assert len(rows) == 16  # frozen, 12 implementation rows as before, floor standard, mini and bat
    floors = {k: rows.pop(k) for k in [("floor", "standard"), ("floor", "mini"), ("floor", "bat")]}
    assert all(float(r["x_frozen"]) > 1 for r in floors.values())
    for (impl, variant), r in rows.items():
        assert r["dtype"] == "bfloat16" and r["autocast"] == "False" and r["preset"] == "metamathqa"
        assert r["block_dtype"] == ("" if impl == "frozen" else "float32")  # get_peft_model's default, and inject's
        assert float(r["step_ms"]) > 0 and float(r["tokens_per_s"]) > 0 and float(r["saved_bytes"]) > 0
        assert r["loss_ok"] == "True", r
        finite = lambda k: math.isfinite(float(r[k]))  # noqa: E731
        assert finite("vs_peft") == (impl not in ("peft", "frozen")), (impl, variant)
        assert finite("bat_vs_default") == variant.startswith("bat"), (impl, variant)
        assert finite("vs_lora") == (variant not in ("lora", "frozen")), (impl, variant)
        assert finite("loss_max_abs_diff") == (impl not in ("peft", "frozen"))
        assert finite("x_frozen") and finite("peak_bytes") and float(r["peak_bytes"]) > 0
    # Same initial weights and batches: every MiSS row starts from the identity adapter, and the
    # frozen model is that same model.
    assert len({r["first_loss"] for r in rows.values()}) == 1
    # PEFT's numbers, where the implementation computes them.
    for impl in ("inject", "patch"):
        for v in ("standard", "mini", "bat-promote"):
            assert float(rows[(impl, v)]["loss_max_abs_diff"]) < 1e-3, (impl, v)


def test_preset_autocast_flag(tmp_path):
    args = ["train", "--preset", "metamathqa", *TINY, "--steps", "2", "--autocast", "--variants", "standard,bat",
            "--no-lora", "--csv", str(tmp_path / "a.csv")]
    assert cli.main(args) == 0
    with open(tmp_path / "a.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["autocast"] == "True" for r in rows)
    trained = [r for r in rows if r["impl"] != "floor"]
    assert len(trained) == 9 and all(r["loss_ok"] == "True" for r in trained)  # frozen + the 8 MiSS rows
    assert [(r["impl"], r["variant"]) for r in rows if r["impl"] == "floor"] == [("floor", "standard"), ("floor", "bat")]


def test_step_default_tiny(tmp_path, capsys):
    """`python -m bench train`'s default preset at tiny sizes: bf16 model, fp32 blocks, all and
    q/v, autocast off and on; a frozen row and floor rows per configuration; every ratio lower
    is better; the losses agree with PEFT's."""
    out_csv = tmp_path / "step.csv"
    rc, rows = cli.run(["train", *TINY, "--steps", "2", "--variants", "standard,mini", "--no-lora",
                        "--csv", str(out_csv)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lower is better" in text.splitlines()[2] and "x frozen, lower is better" in text
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    configs = {(r["targets"], r["autocast"]) for r in rows}
    assert configs == {(t, a) for t in ("all", "qv") for a in (False, True)}
    for t, a in configs:
        got = {(r["impl"], r["variant"]): r for r in rows if (r["targets"], r["autocast"]) == (t, a)}
        assert set(got) == {("frozen", "frozen"), ("peft", "standard"), ("peft", "mini"), ("inject", "standard"),
                            ("inject", "mini"), ("floor", "standard"), ("floor", "mini")}
        frozen = got[("frozen", "frozen")]
        assert frozen["x_frozen"] == 1.0 and frozen["trainable_params"] == 0 and frozen["saved_bytes"] > 0
        assert frozen["saved_vs_frozen"] == 0 and frozen["peak_vs_frozen"] == 0
        for key, r in got.items():
            assert r["preset"] == "step" and r["dtype"] == "bfloat16"
            assert math.isfinite(r["x_frozen"]) and r["x_frozen"] > 0, key
            if key[0] == "inject":
                assert math.isfinite(r["vs_peft"]) and r["loss_ok"] and r["loss_max_abs_diff"] <= r["loss_tol"]
                assert r["block_dtype"] == "float32"
        for v in ("standard", "mini"):
            fl = got[("floor", v)]
            # The floor is the frozen step plus a positive amount: its ratio says so.
            assert fl["step_ms"] == pytest.approx(frozen["step_ms"] + fl["floor_extra_ms"])
            assert fl["x_frozen"] == pytest.approx(fl["step_ms"] / frozen["step_ms"]) and fl["x_frozen"] > 1


def test_train_ratios_are_time_over_the_other():
    """x frozen and /peft are this row's time over the other's (lower is better), paired per round."""
    from bench.train_bench import TrainConfig
    from bench.train_preset import PRESETS, Contestant, Entry, summarize

    def row(impl, variant, times):
        c = Contestant(Entry(impl, variant), torch.nn.Linear(1, 1), [], None)
        c.times, c.losses, c.peaks = list(times), [1.0, 1.0], [10.0]
        return c

    cs = [row("frozen", "frozen", [1, 2, 4]), row("peft", "standard", [3, 6, 12]), row("inject", "standard", [2, 4, 8])]
    saved = {"frozen/frozen": 100, "peft/standard": 300, "inject/standard": 150}
    out = {r["impl"]: r for r in summarize(cs, saved, TrainConfig(), PRESETS["step"], torch.bfloat16, "all")}
    assert (out["peft"]["x_frozen"], out["inject"]["x_frozen"], out["inject"]["vs_peft"]) == (3.0, 2.0, 2 / 3)
    assert (out["peft"]["saved_vs_frozen"], out["inject"]["saved_vs_frozen"]) == (200, 50)


def test_train_floor_parts():
    """The model-level floor counts, per adapted layer, the block sum read, three products and
    the tiled-gradient pass; products in bf16 under autocast, else the cheaper fp32 route."""
    from bench.train_bench import TrainConfig
    from bench.train_floor import layer_floor_ms, layer_shapes

    cfg = TrainConfig(layers=3, hidden=64, intermediate=96, heads=4, kv_heads=2, r=8, mini_r=4)
    shapes = layer_shapes(cfg, "all")
    assert shapes == {(64, 64): 6, (64, 32): 6, (64, 96): 6, (96, 64): 3}
    assert layer_shapes(cfg, "qv") == {(64, 64): 3, (64, 32): 3}
    t = {"bf16_gemm": 1.0, "pass_dx": 0.5, "read_x_sum": 0.3, "read_x_blocksum": 0.2, "read_g_sum": 0.1,
         "read_g_blocksum": 0.4, "standard_fwd": 9.0, "standard_dd": 0.01, "standard_ds": 9.0,
         "mini_fwd": 0.1, "mini_dd": 0.2, "mini_ds": 0.3}
    n, fin, fout = 100, 64, 64
    rate = 2.0 * n * fin * fout  # flops per ms of the bf16 GEMM (1 ms)
    small = 2.0 * n * cfg.r * fout
    on = layer_floor_ms(t, "standard", n, fin, fout, cfg, autocast=True)
    assert on == pytest.approx({"read_x": 0.2, "products": 18.01, "grad_add": 0.5})
    off = layer_floor_ms(t, "standard", n, fin, fout, cfg, autocast=False)
    assert off["products"] == pytest.approx(6 * small / rate + 0.01 + 2 * small / rate)
    mini = layer_floor_ms(t, "mini", n, fin, fout, cfg, autocast=True)
    assert mini["read_g"] == 0.1 and mini["products"] == pytest.approx(0.6)
    # BAT: G^T x at the cheaper of its own product and the frozen GEMM, W' formed twice (a pass
    # over W and 2 r in out flops each), the contraction; fp32 accuracy in pieces without autocast
    t.update({"bat_gw": 1.5, "pass_w": 0.25})
    bat_flops = 2.0 * cfg.r * fin * fout
    assert layer_floor_ms(t, "bat", n, fin, fout, cfg, autocast=True) == pytest.approx(
        {"gw": 1.0, "transform": 2 * (0.25 + bat_flops / rate), "contraction": bat_flops / rate})
    assert layer_floor_ms(t, "bat", n, fin, fout, cfg, autocast=False) == pytest.approx(
        {"gw": 1.0, "transform": 2 * (0.25 + 2 * bat_flops / rate), "contraction": 3 * bat_flops / rate})


def test_adamw_choice_builds_that_optimizer():
    from bench.train_bench import TrainConfig, optimizer

    p = [torch.nn.Parameter(torch.zeros(4))]
    assert optimizer(p, TrainConfig()).defaults["fused"] is True
    assert not optimizer(p, TrainConfig(adamw="plain")).defaults["fused"]
    with pytest.raises(ValueError, match="adamw"):
        optimizer(p, TrainConfig(adamw="sgd"))


def test_train_floor_rows_count_the_optimizer():
    """A floor row is the frozen step plus every layer's parts plus the optimizer over the blocks
    (clipping and AdamW, as the run is configured), each part named in floor_parts_ms."""
    from bench.train_bench import TrainConfig
    from bench.train_floor import floor_rows

    cfg = TrainConfig(layers=1, hidden=32, intermediate=48, heads=2, vocab=64, seq=8, batch=1, r=4, mini_r=4,
                      grad_clip=1.0)
    rows = floor_rows(cfg, "qv", torch.float32, frozen_ms=1.0, warmup=0, repeats=1)
    assert [r["variant"] for r in rows] == ["standard", "mini", "bat"]
    for row in rows:
        parts = dict(kv.split("=") for kv in row["floor_parts_ms"].split())
        want = {"gw", "transform", "contraction"} if row["variant"] == "bat" else {"read_x", "products", "grad_add"}
        assert set(parts) == want | {"optimizer"} | ({"read_g"} if row["variant"] == "mini" else set())
        assert float(parts["optimizer"]) > 0
        assert row["step_ms"] == pytest.approx(1.0 + row["floor_extra_ms"])
        assert row["floor_extra_ms"] == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-2)


def test_floor_parts_take_a_round_after_each_round_of_steps():
    """run_preset_case times the floor's parts in its own rounds (one sample of every part per
    timed round, none in the warm-up rounds), so they meet the machine as the rows do."""
    from bench.train_bench import TrainConfig
    from bench.train_floor import FloorParts
    from bench.train_preset import PRESETS, entries, run_preset_case

    cfg = TrainConfig(layers=1, hidden=32, intermediate=48, heads=2, vocab=64, seq=8, batch=1, r=4, mini_r=4,
                      steps=4, warmup=1)
    parts = FloorParts(cfg, "qv", torch.bfloat16, "cpu", ("standard", "bat"))
    assert all(not t for t in parts.times.values())
    rows = run_preset_case(cfg, PRESETS["step"], entries(("standard",), lora=False, impls=("inject",)),
                           torch.bfloat16, "qv", "cpu", floor=parts)
    assert {len(t) for t in parts.times.values()} == {cfg.steps - cfg.warmup}
    assert ("optimizer", "bat") in parts.times and ((32, 32), "bat_gw") in parts.times
    frozen = next(r for r in rows if r["impl"] == "frozen")
    floor = parts.rows(frozen["step_ms"])
    assert [r["variant"] for r in floor] == ["standard", "bat"]
    assert all(r["step_ms"] > frozen["step_ms"] for r in floor)


def test_step_profile_puts_each_operator_in_its_rows_column():
    """profile --preset: miss_ext's operators show up in our row only, the frozen model's step
    has no adapter operator, and the table's total is the sum of its column."""
    from bench.step_profile import op_times, step_table
    from bench.train_bench import TrainConfig, make_batches
    from bench.train_preset import PRESETS, build_contestants, entries

    cfg = TrainConfig(layers=1, hidden=32, intermediate=48, heads=2, vocab=64, seq=8, batch=1, r=4, mini_r=4)
    cs = build_contestants(cfg, PRESETS["step"], entries(("standard",), lora=False, impls=("peft", "inject")),
                           torch.bfloat16, "all", "cpu")
    batches = make_batches(cfg, "cpu")
    cols = {c.entry.impl: op_times(c, batches, cfg, "cpu", steps=2, warmup=1) for c in cs}
    assert set(cols) == {"frozen", "peft", "inject"}
    ours = {k for k in cols["inject"] if k.startswith("miss_ext::")}
    assert {"miss_ext::miss_linear", "miss_ext::miss_block_grads"} <= ours
    for impl in ("frozen", "peft"):
        assert not any(k.startswith("miss_ext::") for k in cols[impl]), impl
    assert not any("Optimizer" in k for k in cols["frozen"]) and any("Optimizer" in k for k in cols["inject"])
    lines = step_table({"a": {"x": 1.0, "y": 2.0, "z": 0.5}, "b": {"x": 4.0}}, top=1)
    assert lines[2].split("|")[1].split() == ["3.50", "4.00"]  # the total
    assert lines[3].split("|")[0].strip() == "x" and lines[4].split("|")[1].split() == ["2.50", "0.00"]


def test_step_profile_cli(capsys):
    rc = cli.main(["profile", "--preset", "step", *TINY, "--targets", "qv", "--autocast", "on", "--variants", "bat",
                   "--impls", "inject", "--repeats", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "## step profile: bfloat16, targets qv, autocast on" in out
    head = next(line for line in out.splitlines() if line.startswith("operator"))
    assert head.split("|")[1].split() == ["frozen", "inject", "bat", "inject", "bat-promote"]
    with pytest.raises(SystemExit):
        cli.main(["profile", "--autocast", "on"])


def test_bench_imports_no_cycle():
    """No bench module imports the command line back, and bench's own modules are imported at
    the top of a file, never inside a function (issue 18)."""
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and path.stem not in ("__init__", "__main__"):
                assert node.module != "cli", f"{path.name} imports bench.cli"
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    assert not node.level and not (node.module or "").startswith(("bench", "miss_ext")), \
                        f"{path.name}:{node.lineno} imports {node.module} inside {fn.name}"
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                    assert not any(n.startswith(("bench", "miss_ext")) for n in names), \
                        f"{path.name}:{node.lineno} imports {names} inside {fn.name}"


def test_floor_mode_smoke(capsys):
    rc = cli.main(["floor", "--suite", "smoke", "--threads", "1", "--repeats", "2", "--warmup", "1"])
    assert rc == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] and line.split()[0] in VARIANTS]
    assert [r[0] for r in rows] == list(VARIANTS)
    for r in rows:
        floor_total, ours = float(r[-5]), float(r[-2])
        assert floor_total >= 1.0 and math.isfinite(ours) and ours > 0


def test_floor_model_counts_the_parts():
    """Standard MiSS, mixed: each product at the cheaper of the fp32 GEMM and its bf16 pieces at
    the frozen GEMM's rate; the memory passes added; the block sum read by the faster reader."""
    from bench import cases as K
    from bench.floor import floor_of

    case = K.Case("standard", torch.bfloat16, K.Shape(100, 200, 300, 10, 10), torch.float32)
    t = {"fl_fwd": 2.0, "fl_bwd": 2.0, "pass_out": 0.1, "pass_in": 0.2, "pass_w": 0.3, "read_x": 0.05,
         "read_x_blocksum": 0.04, "read_g": 0.5, "read_g_blocksum": 0.06, "fp32_fwd": 10.0,
         "fp32_ds": 0.01, "fp32_dd": 10.0}
    # rate: 2*100*200*300 / 2 ms = 6e6 flops/ms; one small product 2*100*10*300 = 6e5 flops.
    f = floor_of(case, t)
    assert f["fwd"] == pytest.approx(2.0 + 0.04 + 6 * 0.1 + 0.1)  # six pieces beat 10 ms of fp32
    assert f["bwd"] == pytest.approx(2.0 + 0.01 + 3 * 0.1 + 0.2)  # fp32 dS; dD in three pieces


def test_floor_model_caps_the_pieces_where_fp32_runs_at_half_the_bf16_rate():
    """fp32_cost = 2 (an fp32 product at half the bf16 rate, AVX512-BF16 without AMX): no
    product counts more than two bf16 pieces; dS's two stay two, and the cheaper fp32 GEMM still
    wins where it is cheaper."""
    from bench import cases as K
    from bench.floor import floor_of

    case = K.Case("standard", torch.bfloat16, K.Shape(100, 200, 300, 10, 10), torch.float32)
    t = {"fl_fwd": 2.0, "fl_bwd": 2.0, "pass_out": 0.1, "pass_in": 0.2, "pass_w": 0.3, "read_x": 0.05,
         "read_x_blocksum": 0.04, "read_g": 0.5, "read_g_blocksum": 0.06, "fp32_fwd": 10.0,
         "fp32_ds": 0.01, "fp32_dd": 10.0}
    f = floor_of(case, t, fp32_cost=2.0)
    assert f["fwd"] == pytest.approx(2.0 + 0.04 + 2 * 0.1 + 0.1)
    assert f["bwd"] == pytest.approx(2.0 + 0.01 + 2 * 0.1 + 0.2)
    bat = K.Case("bat", torch.bfloat16, K.Shape(100, 200, 300, 10, 10), torch.float32)
    fb = floor_of(bat, {"fl_fwd": 2.0, "fl_bwd": 2.0, "pass_w": 0.3, "gw": 3.0}, fp32_cost=2.0)
    transform = 0.3 + 2 * (2.0 * 300 * 200 * 10) / 6e6
    assert fb["bwd"] == pytest.approx(2.0 + transform + 2.0 + 2 * (2.0 * 300 * 200 * 10) / 6e6)


def test_floor_model_bat_takes_gw_at_the_better_rate():
    from bench import cases as K
    from bench.floor import floor_of

    case = K.Case("bat", torch.bfloat16, K.Shape(100, 200, 300, 10, 10), torch.float32)
    t = {"fl_fwd": 2.0, "fl_bwd": 2.0, "pass_w": 0.3, "gw": 3.0}
    transform = 0.3 + 2 * (2.0 * 300 * 200 * 10) / 6e6
    f = floor_of(case, t)
    assert f["fwd"] == pytest.approx(2.0 + transform)
    assert f["bwd"] == pytest.approx(2.0 + transform + 2.0 + 3 * (2.0 * 300 * 200 * 10) / 6e6)


def test_half_emulation_bench_tiny(capsys):
    from bench import half_emulation_bench

    half_emulation_bench.main(["--rounds", "1", "--shape", "16,64,128,16"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        f"{v}, {a}" for v in ("standard", "mini", "bat") for a in ("off", "on")]
    for row in rows:  # four positive, finite ratios
        ratios = [float(c) for c in row.split("|")[2:6]]
        assert all(0 < v < math.inf for v in ratios), row


def test_overhead_bench_tiny(capsys):
    from bench import overhead_bench

    overhead_bench.main(["--rounds", "1", "--calls", "2", "--variants", "standard,bat"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("standard ", "bat "))]
    assert len(rows) == 6
    for row in rows:  # the frozen time and the four ratios: positive and finite
        cells = row.split("|")
        values = [float(cells[1])] + [float(v) for v in cells[3].split()]
        assert len(values) == 5 and all(0 < v < math.inf for v in values), row
