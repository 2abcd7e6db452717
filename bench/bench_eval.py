"""Evaluation-throughput benchmark: our sliding-window and score-first TTT evaluation against a plain
implementation (eager mode, one batch of windows at a time, logits for every position).

  DATA_DIR=./data_corpus python bench/bench_eval.py --tokens 262144

Uses a freshly initialised model (speed does not depend on the weights) and the first --tokens tokens
of the validation split. Prints one JSON line: tokens/s of each path and the speedups, and checks that
both paths give the same loss (to bf16 tolerance). Each path runs --reps timed passes from the same
weights and counts the median: single short passes of the compiled path varied by up to 25 % on one H100.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def truncate(val: tg.ValidationData, n: int) -> tg.ValidationData:
    val.tokens_np = val.tokens_np[:n]
    val.tokens = val.tokens[:n]
    val.target_bytes = val.target_bytes[:n]
    val.cum_bytes = val.cum_bytes[:n + 1]
    return val


@torch.no_grad()
def plain_score(model, val, h, device, windows) -> float:
    """The reference path: eager blocks, full logits for all positions, then pick the scored ones."""
    loss = 0.0
    Lw = int(windows[0, 2] - windows[0, 1]) if windows[0, 1] == 1 else h.eval_seq_len
    for lo in range(0, len(windows), h.eval_batch_seqs):
        sel = windows[lo:lo + h.eval_batch_seqs]
        win = val.tokens[torch.from_numpy(sel[:, 0])[:, None] + torch.arange(Lw + 1)].to(device)
        logits = tg.softcapped_logits(model.forward_hidden(win[:, :-1]), model.head_weight(), model.logit_softcap)
        nll = F.cross_entropy(logits.flatten(0, 1), win[:, 1:].flatten(), reduction="none").view(len(sel), -1)
        for i, (start, a, b) in enumerate(sel.tolist()):
            loss += nll[i, a - start - 1:b - start - 1].double().sum().item()
    return loss


def plain_sliding(model, val, h, device) -> float:
    plan = tg.plan_windows(val.n, h.eval_seq_len, h.eval_stride)
    return plain_score(model, val, h, device, plan)


def plain_ttt(model, val, h, device, cfg) -> float:
    plan = tg.plan_windows(val.n, h.eval_seq_len, h.eval_stride)
    chunk_of = (plan[:, 1] - 1) // cfg.chunk_tokens
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss, n_chunks = 0.0, int(chunk_of[-1]) + 1
    for c in range(n_chunks):
        loss += plain_score(model, val, h, device, plan[chunk_of == c])
        if c < n_chunks - 1:
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(c, n_chunks)
            lo, hi = c * cfg.chunk_tokens + 1, (c + 1) * cfg.chunk_tokens + 1
            tg.ttt_train_chunk(model, val, lo, hi, opt, cfg, device, h.rank, h.world_size)
    return loss


def seconds(device, fn):
    out, ms = tg.timed(device, fn)
    return out, ms / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--reps", type=int, default=3, help="timed passes per path, the median counts (short passes vary by up to 25 %%)")
    args = ap.parse_args()
    h = tg.Hyperparameters()
    device = tg.setup_device(h)
    tg.log.open(None, enabled=h.is_main)
    val = truncate(tg.ValidationData(h, device), args.tokens)
    torch.manual_seed(0)
    model = tg.GPT(h).to(device)
    model.looping = h.num_loops > 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tg.TTTConfig.from_settings(h)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tokens": val.n - 1}
    spreads: list[float] = []

    def passes(fn, loss_of=float):
        """args.reps timed passes of fn, each from the same weights (TTT trains the model). Returns the first
        pass's result, the median seconds and every pass's seconds. The passes' losses go into spreads as a
        relative range (0 on CPU; GPU backward kernels with atomics may differ in the last bits)."""
        results, times = [], []
        for _ in range(args.reps):
            model.load_state_dict(state)
            result, t = seconds(device, fn)
            results.append(result)
            times.append(t)
        losses = [loss_of(r) for r in results]
        spreads.append((max(losses) - min(losses)) / abs(losses[0]))
        return results[0], statistics.median(times), [round(t, 3) for t in times]

    eval_loss = lambda r: r[0].loss  # noqa: E731 - evaluate_sliding returns (EvalResult, legality)
    # plain (eager) paths
    model.use_runtime(tg.build_runtime(h.replace(compile="0"), device))
    plain_loss, t, out["plain_sliding_s"] = passes(lambda: plain_sliding(model, val, h, device))
    out["plain_sliding_tok_s"] = round((val.n - 1) / t)
    plain_ttt_loss, t, out["plain_ttt_s"] = passes(lambda: plain_ttt(model, val, h, device, cfg))
    out["plain_ttt_tok_s"] = round((val.n - 1) / t)
    # ours (compiled, head on scored positions only); a short first pass compiles, then the timed passes
    model.load_state_dict(state)
    model.use_runtime(tg.build_runtime(h, device))
    t_compile = time.perf_counter()
    tg.evaluate_sliding(model, truncate(tg.ValidationData(h, device), 8 * h.eval_seq_len), h, device)
    tg.ttt_compile_warmup(model, cfg, device, h.world_size)
    out["compile_s"] = round(time.perf_counter() - t_compile, 1)
    (r, _), t, out["sliding_s"] = passes(lambda: tg.evaluate_sliding(model, val, h, device), eval_loss)
    out["sliding_tok_s"] = round((val.n - 1) / t)
    (r2, _), t, out["ttt_s"] = passes(lambda: tg.evaluate_sliding(model, val, h, device, ttt=cfg), eval_loss)
    out["ttt_tok_s"] = round((val.n - 1) / t)
    out["pass_loss_spread"] = float(f"{max(spreads):.2e}")
    out["sliding_speedup"] = round(out["sliding_tok_s"] / out["plain_sliding_tok_s"], 2)
    out["ttt_speedup"] = round(out["ttt_tok_s"] / out["plain_ttt_tok_s"], 2)
    out["loss_plain"], out["loss_ours"] = round(plain_loss / (val.n - 1), 5), round(r.loss, 5)
    out["ttt_loss_plain"], out["ttt_loss_ours"] = round(plain_ttt_loss / (val.n - 1), 5), round(r2.loss, 5)
    if h.is_main:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
