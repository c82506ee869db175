"""Output: an aligned text table, a CSV (every number plus where it was measured), a PNG chart."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

Column = Tuple[str, str, Callable[[dict], str]]  # (group, header, cell)


def _num(v, fmt: str) -> str:
    if v is None or v == "":
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "-"
    return format(f, fmt)


def _ms(v) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return _num(v, ".3g" if v < 10 else ".1f")


def _bytes(v) -> str:
    """Binary-prefixed size: 0, 512B, 12.0K, 3.1M, 1.50G (negative allowed)."""
    if v is None or v == "":
        return "-"
    f = float(v)
    if math.isnan(f):
        return "-"
    if f == 0:
        return "0"
    sign, a = ("-" if f < 0 else ""), abs(f)
    for unit, scale, fmt in (("G", 2**30, ".2f"), ("M", 2**20, ".1f"), ("K", 2**10, ".1f")):
        if a >= scale:
            return f"{sign}{format(a / scale, fmt)}{unit}"
    return f"{sign}{int(a)}B"


def format_table(columns: Sequence[Column], rows: List[dict], sep: str = " | ") -> str:
    """Columns are grouped by their first field; a group title line sits above the headers."""
    cells = [[c[2](r) for c in columns] for r in rows]
    widths = [max([len(c[1])] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    # Spans of consecutive columns sharing a group.
    spans = []
    for i, c in enumerate(columns):
        if spans and spans[-1][0] == c[0]:
            spans[-1][2] = i + 1
        else:
            spans.append([c[0], i, i + 1])
    # Widen the last column of a group whose title is longer than its columns.
    for g, a, b in spans:
        have = sum(widths[a:b]) + (b - a - 1)
        if len(g) > have:
            widths[b - 1] += len(g) - have

    def line(values, align):
        parts = []
        for g, a, b in spans:
            parts.append(" ".join(align(values[i], widths[i], i) for i in range(a, b)))
        return sep.join(parts).rstrip()

    def right_unless_first(v, w, i):
        return v.ljust(w) if columns[i][0] == columns[0][0] else v.rjust(w)

    title = sep.join(g.center(sum(widths[a:b]) + (b - a - 1)) for g, a, b in spans).rstrip()
    head = line([c[1] for c in columns], right_unless_first)
    rule = "-" * max(len(title), len(head))
    body = [line(row, right_unless_first) for row in cells]
    return "\n".join([title, head, rule, *body])


def layer_columns(show_peak: bool = False) -> List[Column]:
    cols: List[Column] = [
        ("case", "variant", lambda r: r["variant"]),
        ("case", "dtype", lambda r: r["dtype"]),
        ("case", "N x in x out", lambda r: f"{r['tokens']}x{r['in_features']}x{r['out_features']}"),
        ("case", "r", lambda r: str(r["r"])),
        ("case", "m", lambda r: str(r["mini_r"]) if r["mini_r"] != "" else "-"),
    ]
    for ph, title in (("fwd", "forward"), ("bwd", "backward"), ("total", "fwd+bwd")):
        cols += [
            (title, "floor ms", lambda r, ph=ph: _ms(r.get(f"floor_{ph}_ms"))),
            (title, "peft/fl", lambda r, ph=ph: _num(r.get(f"peft/floor_{ph}"), ".2f")),
            (title, "ours/fl", lambda r, ph=ph: _num(r.get(f"ours/floor_{ph}"), ".2f")),
            (title, "ours/peft", lambda r, ph=ph: _num(r.get(f"ours/peft_{ph}"), ".2f")),
        ]
    cols.append(("fwd+bwd", "ours/flW", lambda r: _num(r.get("ours/floorW_total"), ".2f")))
    cols.append(("fwd+bwd", "flops", lambda r: _num(r.get("flops/floor_total"), ".2f")))
    cols += [
        ("extra saved vs floor", "ours", lambda r: _bytes(r["ours_extra_saved_bytes"])),
        ("extra saved vs floor", "ours %W", lambda r: _num(100 * r["ours_extra_saved_frac_w"], ".1f")),
        ("extra saved vs floor", "peft", lambda r: _bytes(r["peft_extra_saved_bytes"])),
        ("extra saved vs floor", "peft %W", lambda r: _num(100 * r["peft_extra_saved_frac_w"], ".1f")),
    ]
    if show_peak:
        cols += [
            ("extra peak vs floor", "ours", lambda r: _bytes(r["ours_extra_peak_bytes"])),
            ("extra peak vs floor", "peft", lambda r: _bytes(r["peft_extra_peak_bytes"])),
        ]
    cols += [
        ("max rel err", "vs ref", lambda r: _num(r.get("err_ref"), ".1e")),
        ("max rel err", "vs peft", lambda r: _num(r.get("err_peft"), ".1e")),
        ("err/frozen", "ours", lambda r: _num(r.get("err_frozen"), ".2f")),
        ("err/frozen", "peft", lambda r: _num(r.get("peft_err_frozen"), ".2f")),
        ("err/frozen", "|y|/|yfr|", lambda r: _num(r.get("y_growth"), ".2f")),
    ]
    return cols


def layer_table(rows: List[dict], show_peak: bool = False) -> str:
    return format_table(layer_columns(show_peak), rows)


def _loss_ok(r: dict) -> str:
    ok = r.get("loss_ok")
    return "-" if ok in (None, "") else ("yes" if ok else "NO")


def preset_columns(on_cuda: bool = False, steps: int | str = "N") -> List[Column]:
    """One training configuration's rows (frozen, implementations, LoRA, floor). The peak is
    CUDA's allocator statistic ``on_cuda``, else the profiler's (CPU)."""
    peak = "peak memory of a step" + ("" if on_cuda else " (profiler)")
    return [
        ("row", "impl", lambda r: r["impl"]),
        ("row", "variant", lambda r: r["variant"]),
        ("step (fwd+bwd+AdamW)", "ms", lambda r: _ms(r["step_ms"])),
        ("step (fwd+bwd+AdamW)", "tokens/s", lambda r: _num(r["tokens_per_s"], ".0f")),
        ("step (fwd+bwd+AdamW)", "x frozen", lambda r: _num(r.get("x_frozen"), ".2f")),
        ("step (fwd+bwd+AdamW)", "/peft", lambda r: _num(r.get("vs_peft"), ".2f")),
        ("step (fwd+bwd+AdamW)", "bat/default", lambda r: _num(r.get("bat_vs_default"), ".2f")),
        ("saved for backward", "bytes", lambda r: _bytes(r.get("saved_bytes"))),
        ("saved for backward", "vs frozen", lambda r: _signed_bytes(r.get("saved_vs_frozen"))),
        (peak, "bytes", lambda r: _bytes(r.get("peak_bytes"))),
        (peak, "vs frozen", lambda r: _signed_bytes(r.get("peak_vs_frozen"))),
        (f"loss after {steps} steps", "loss", lambda r: _num(r.get("loss"), ".6f")),
        ("loss vs peft (same variant)", "max |diff|", lambda r: _num(r.get("loss_max_abs_diff"), ".1e")),
        ("loss vs peft (same variant)", "tol", lambda r: _num(r.get("loss_tol"), ".1e")),
        ("loss vs peft (same variant)", "ok", _loss_ok),
    ]


def _signed_bytes(v) -> str:
    text = _bytes(v)
    return text if text in ("-", "0") or text.startswith("-") else "+" + text


def config_key(r: dict) -> tuple:
    return (r["dtype"], r["targets"], bool(r["autocast"]) if not isinstance(r["autocast"], str)
            else r["autocast"] == "True")


def config_title(key: tuple) -> str:
    dtype, targets, autocast = key
    what = {"all": "all-linear", "qv": "q_proj,v_proj"}.get(targets, targets)
    return f"== {dtype} model, MiSS on {what}, {'autocast(bf16)' if autocast else 'no autocast'}"


def group_by_config(rows: List[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(config_key(r), []).append(r)
    return groups


def preset_table(rows: List[dict], on_cuda: bool = False) -> str:
    """A table per (dtype, targets, autocast), under a title line."""
    steps = next((r["steps"] for r in rows if "steps" in r), "N")
    cols = preset_columns(on_cuda, steps)
    return "\n\n".join(f"{config_title(k)}\n{format_table(cols, g)}" for k, g in group_by_config(rows).items())


def _short(r: dict) -> str:
    impl = {"inject": "ours", "patch": "patch"}.get(r["impl"], r["impl"])
    variant = {"standard": "default", "bat-promote": "bat-pr", "lora": "lora-r" + str(r.get("r", ""))}.get(
        r["variant"], r["variant"])
    return f"{impl} {variant}"


SUMMARIES = {
    # key: (column group title, cell format, rows left out)
    "x_frozen": ("x frozen, lower is better", lambda v: _num(v, ".2f"), ("frozen",)),
    "vs_peft": ("ours / PEFT (same variant), lower is better", lambda v: _num(v, ".2f"), ("frozen", "peft", "floor")),
    "peak_vs_frozen": ("peak memory of a step minus the frozen model's", _signed_bytes, ("frozen", "floor")),
}


def summary_table(rows: List[dict], key: str = "x_frozen") -> str:
    """One line per configuration, one number (``key``) per row: the issue's table."""
    title, cell, skip = SUMMARIES[key]
    groups = group_by_config(rows)
    labels: List[str] = []
    for g in groups.values():
        for r in g:
            if r["impl"] not in skip and _short(r) not in labels:
                labels.append(_short(r))
    cols: List[Column] = [
        ("configuration", "dtype", lambda k: k[0][0]),
        ("configuration", "targets", lambda k: k[0][1]),
        ("configuration", "autocast", lambda k: "on" if k[0][2] else "off"),
        ("configuration", "frozen ms", lambda k: _ms(next((r["step_ms"] for r in k[1] if r["impl"] == "frozen"),
                                                          math.nan))),
    ]
    for lab in labels:
        cols.append((title, lab, lambda k, lab=lab: cell(next((r.get(key) for r in k[1] if _short(r) == lab), None))))
    return format_table(cols, list(groups.items()))


def write_csv(path, rows: List[dict], meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: List[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    fields += [k for k in meta if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    return path


def write_png(path, rows: List[dict], title: str = "") -> Path | None:
    """Grouped bars of peft/floor and ours/floor (and BAT's floorW/floor) per phase.
    Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{r['variant']}\n{r['dtype']}\n{r['in_features']}x{r['out_features']}\nr{r['r']}" for r in rows]
    series = (("peft/floor", "PEFT", "tab:orange"), ("ours/floor", "miss_ext", "tab:blue"),
              ("floorW/floor", "linear w/ weight grad (BAT floor)", "tab:gray"))
    phases = (("fwd", "forward"), ("bwd", "backward"), ("total", "forward + backward"))
    n = len(rows)
    fig, axes = plt.subplots(len(phases), 1, figsize=(max(6.0, 1.1 * n + 2), 9), sharex=True)
    width = 0.27
    for ax, (ph, name) in zip(axes, phases):
        for k, (key, lab, color) in enumerate(series):
            vals = [r.get(f"{key}_{ph}", math.nan) for r in rows]
            vals = [v if isinstance(v, (int, float)) else math.nan for v in vals]
            if all(math.isnan(v) for v in vals):
                continue
            xs = [i + (k - 1) * width for i in range(n)]
            bars = ax.bar(xs, vals, width, label=lab, color=color)
            for b, v in zip(bars, vals):
                if math.isfinite(v) and v > 0:
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=6, xytext=(0, 1), textcoords="offset points")
        model = [r.get(f"flops/floor_{ph}", math.nan) for r in rows]
        model = [v if isinstance(v, (int, float)) else math.nan for v in model]
        if not all(math.isnan(v) for v in model):
            ax.scatter(range(n), model, marker="_", s=400, color="black", zorder=3,
                       label="flop model (docs/MATH.md §8)")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel(f"{name}\ntime / frozen linear (log)")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[-1].set_xticks(range(n))
    axes[-1].set_xticklabels(labels, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
