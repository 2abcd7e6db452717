"""Plot train_loss against step (and the val_bpb points) for one or more train_gpt.py logs.

    python tools/plot_loss.py logs/train_seed42.log logs/train_seed314.log --out loss.png

One line per log, labelled "seed N" (or the RUN_ID / file name when a log has no SEED). val_bpb points
share the step axis on a second y axis. Needs matplotlib (pip install matplotlib); partial logs are fine.
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


def label(run: RunLog) -> str:
    if run.seed is not None:
        return f"seed {run.seed}"
    return run.run_id or Path(run.path).stem


def plot(runs: list[RunLog], out: str | Path, title: str = "") -> Path:
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("plot_loss needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    ax_val = ax.twinx() if any(r.val for r in runs) else None
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if run.train:
            steps, losses, _ = zip(*run.train)
            ax.plot(steps, losses, color=color, lw=1.2, label=f"{label(run)} train_loss")
        if run.val and ax_val is not None:
            steps, _, bpbs = zip(*run.val)
            ax_val.plot(steps, bpbs, "o", color=color, ms=5, mfc="none", label=f"{label(run)} val_bpb")
    ax.set_xlabel("step")
    ax.set_ylabel("train_loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax_val is not None:
        ax_val.set_ylabel("val_bpb")
        more = ax_val.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.set_title(title or "train_gpt.py: " + ", ".join(label(r) for r in runs))
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
