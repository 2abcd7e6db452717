"""Plot train_loss against step, with the validation points, for one or more train_gpt.py logs.

    python tools/plot_loss.py logs/train_seed42.log logs/train_seed314.log --out loss.png

One colour per log, labelled "seed N" (with the RUN_ID or file name added when two logs share a seed, or
alone when a log has no SEED). Everything is in nats/token on one axis: the train_loss line, the in-training
val_loss points (circles) and the end-of-run scores at the last step (pre-quant, quantized, sliding, TTT:
one marker each), so a short CPU run without periodic validation still shows where it ended. The y axis
covers the curves after the first few steps; the early spike above it is cut off (and said so in the
corner). Needs matplotlib (pip install matplotlib); partial logs are fine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.logparse import RunLog, parse_log


class MissingMatplotlib(RuntimeError):
    pass


STAGE_MARKERS = {"pre_quant": ("s", "pre-quant"), "quantized": ("D", "quantized"), "sliding": ("^", "sliding"),
                 "ttt": ("*", "TTT")}
SPIKE_STEPS = 5  # the y range ignores the first steps: a step-2 loss spike would squash everything else


def labels(runs: list[RunLog]) -> list[str]:
    """'seed N' per run; where two runs would get the same label, the RUN_ID (or file name) says which."""
    names = [run.run_id or Path(run.path).stem for run in runs]
    seeds = [f"seed {run.seed}" if run.seed is not None else None for run in runs]
    return [name if seed is None else seed if seeds.count(seed) == 1 else f"{seed} ({name})"
            for seed, name in zip(seeds, names)]


def loss_range(runs: list[RunLog]) -> tuple[float, float] | None:
    """y limits that show every value after the first SPIKE_STEPS steps (and every validation point)."""
    values = [loss for run in runs for step, loss, _ in run.train if step > SPIKE_STEPS]
    values += [loss for run in runs for _, loss, _ in run.val]
    values += [st.val_loss for run in runs for key, st in run.stages.items() if key in STAGE_MARKERS]
    values = [v for v in values if v == v and abs(v) != float("inf")]
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def plot(runs: list[RunLog], out: str | Path, title: str = "") -> Path:
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("plot_loss needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    names = labels(runs)
    for i, (run, name) in enumerate(zip(runs, names)):
        color = f"C{i % 10}"
        if run.train:
            steps, losses, _ = zip(*run.train)
            ax.plot(steps, losses, color=color, lw=1.2, label=f"{name} train_loss")
        if run.val:
            steps, losses, _ = zip(*run.val)
            ax.plot(steps, losses, "o", color=color, ms=5, mfc="none", label=f"{name} val_loss")
        last = run.steps or 0
        for key, (marker, what) in STAGE_MARKERS.items():
            if key in run.stages:
                ax.plot([last], [run.stages[key].val_loss], marker, color=color, ms=7, mfc="none",
                        label=f"{name} {what} (val_bpb {run.stages[key].val_bpb:.4f})")
    limits = loss_range(runs)
    if limits is not None:
        top = max((loss for run in runs for _, loss, _ in run.train), default=limits[1])
        ax.set_ylim(*limits)
        if top > limits[1]:
            ax.text(0.01, 0.98, f"early steps cut off (up to {top:.2f})", transform=ax.transAxes, fontsize=8,
                    va="top", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, legend_labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, legend_labels, fontsize=7, loc="upper right")
    ax.set_title(title or "train_gpt.py: " + ", ".join(names))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("logs", nargs="+", help="train_gpt.py logs")
    ap.add_argument("--out", default="loss.png", help="PNG to write (default: loss.png)")
    ap.add_argument("--title", default="", help="plot title")
    args = ap.parse_args(argv)
    missing = [p for p in args.logs if not Path(p).is_file()]
    if missing:
        print(f"error: no such log: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = [parse_log(p) for p in args.logs]
    if all(r.seed is not None for r in runs):
        runs.sort(key=lambda r: r.seed)
    empty = [r.path for r in runs if not r.train]
    if len(empty) == len(runs):
        print(f"error: no train lines in {', '.join(empty)}", file=sys.stderr)
        return 2
    try:
        out = plot(runs, args.out, args.title)
    except MissingMatplotlib as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
