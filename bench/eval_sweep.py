"""Evaluation settings screened on one artifact: each variant reloads the artifact's weights, then runs
the sliding-window pass, with or without score-first TTT, under the variant's settings.

  DATA_DIR=./data_corpus python bench/eval_sweep.py ARTIFACT "EVAL_SEQ_LEN=3072" "TTT_LR=0.02 TTT_CHUNK_TOKENS=8192" ...

A variant is a space-separated list of NAME=value settings over the artifact's own; it runs TTT when its
settings say TTT_ENABLED=1 or name any TTT_* setting. Prints one JSON line per variant (val_bpb, seconds,
tokens/s) and stops starting new variants once --budget seconds have passed, so a device call ends in time.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sweep_common import arguments, parse_variant, setup, tg, within_budget


def main() -> int:
    args = arguments(__doc__.splitlines()[0], "artifact")
    t_start = time.perf_counter()
    h, device, val = setup()
    model, base = tg.load_eval_model(Path(args.artifact), h, device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for text in within_budget(args.variants, args.budget, t_start):
        overrides = parse_variant(text)
        hv = base.replace(**overrides)
        use_ttt = bool(overrides.get("TTT_ENABLED", any(k.startswith("TTT_") for k in overrides)))
        model.load_state_dict(state)
        t0 = time.perf_counter()
        if use_ttt:  # the pass TTT_MODE names, its compile warm-up included
            (r, legal), ms = tg.timed(device, lambda: tg.evaluate_ttt(model, val, hv, device))
        else:
            (r, legal), ms = tg.timed(device, lambda: tg.evaluate_sliding(model, val, hv, device))
        total_s = time.perf_counter() - t0
        if h.is_main:
            print(json.dumps({"variant": text, "ttt": use_ttt, "val_bpb": round(r.bpb, 6), "val_loss": round(r.loss, 6),
                              "tokens": r.tokens, "eval_s": round(total_s, 1),  # TTT: with its compile warm-up
                              "tok_s": round(r.tokens / (ms / 1000)), "legality": legal}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
