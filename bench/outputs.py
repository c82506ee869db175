"""Where a run's CSV and PNG go, and the comma lists the command line takes; shared by every
mode (bench/cli.py, bench/serving_bench.py) so no mode imports the command line back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from . import env

RESULTS = Path(__file__).resolve().parent / "results"


def csv_list(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def output_paths(args, kind: str, tag: str, png: bool = True) -> Tuple[Path, Optional[Path]]:
    """(csv, png or None) from ``--csv``/``--png``/``--no-png``, else bench/results/<kind>-<tag>-<device>-<time>."""
    base = f"{kind}-{tag}-{torch.device(args.device).type}-{env.stamp()}"
    csv_path = Path(args.csv) if args.csv else RESULTS / f"{base}.csv"
    if not png or args.no_png:
        return csv_path, None
    return csv_path, Path(args.png) if args.png else csv_path.with_suffix(".png")
