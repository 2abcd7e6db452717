"""What bench/eval_sweep.py and bench/quant_sweep.py share: the command line (one input file, the variants,
--budget), the setup a sweep scores with (settings, device, validation data), variant parsing, and the
budget that stops starting variants so a device call ends in time."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def arguments(description: str, input_name: str, input_help: str | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(input_name, help=input_help)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which no new variant starts")
    return ap.parse_args()


def setup():
    """(settings from the environment, device, validation data), with the log on the main rank only."""
    h = tg.Hyperparameters()
    device = tg.setup_device(h)
    tg.log.open(None, enabled=h.is_main)
    return h, device, tg.ValidationData(h, device)


def parse_variant(text: str) -> dict[str, object]:
    """'NAME=value NAME=value' -> {NAME: typed value}, typed as the script types its settings."""
    out = {}
    for item in text.split():
        name, _, raw = item.partition("=")
        out[name] = tg._parse_value(tg.SETTINGS_BY_NAME[name], raw)
    return out


def within_budget(variants: list[str], budget: float, t_start: float) -> Iterator[str]:
    """The variants to run; once `budget` seconds have passed since t_start (the sweep's start, setup
    included), the rest are printed as skipped instead."""
    for text in variants:
        if time.perf_counter() - t_start > budget:
            print(json.dumps({"variant": text, "skipped": "budget"}), flush=True)
            continue
        yield text
