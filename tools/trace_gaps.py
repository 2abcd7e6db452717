"""Where the GPU waits: read a Chrome trace written by `bench/bench_train.py --trace DIR` and report how much of
the traced span no kernel, copy or memset was running, and which host code the GPU was waiting for
(the outermost profiled operation around the launch of the first kernel after each gap).

  python tools/trace_gaps.py trace_noloop.json.gz [--top 15] [--min-gap-us 5]
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import sys

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation"}


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def outermost_spans(host_events: list[dict]) -> dict:
    """Per host thread: sorted starts and the outermost (not nested) operations."""
    by_thread = collections.defaultdict(list)
    for e in sorted(host_events, key=lambda e: (e["ts"], -e["dur"])):
        spans = by_thread[e["tid"]]
        if not spans or e["ts"] >= spans[-1][1]:  # starts after the last outermost one ends
            spans.append((e["ts"], e["ts"] + e["dur"], e["name"]))
    return {tid: ([s[0] for s in spans], spans) for tid, spans in by_thread.items()}


def host_context(tops: dict, tid, ts: float) -> str:
    starts, spans = tops.get(tid, ([], []))
    i = bisect.bisect_right(starts, ts) - 1
    return spans[i][2] if i >= 0 and spans[i][1] >= ts else "(no profiled operation)"


def analyse(events: list[dict], min_gap_us: float = 5.0) -> dict:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit("no GPU events in this trace (was it recorded on a GPU?)")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    tops = outermost_spans([e for e in events if e.get("cat") in HOST_CATEGORIES])
    busy, idle, end = 0.0, collections.Counter(), gpu[0]["ts"]
    count, gaps = collections.Counter(), []
    for e in gpu:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start - end >= min_gap_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            where = host_context(tops, launch["tid"], launch["ts"]) if launch else "(launch not traced)"
            idle[where] += start - end
            count[where] += 1
            gaps.append((start - end, where, e["name"]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - gpu[0]["ts"]
    return {"span_ms": span / 1000, "busy_ms": busy / 1000, "idle_ms": (span - busy) / 1000,
            "idle_by_host_op_ms": {k: round(v / 1000, 3) for k, v in idle.most_common()},
            "gaps_by_host_op": dict(count), "largest_gaps": sorted(gaps, reverse=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    args = ap.parse_args()
    r = analyse(load_events(args.trace), args.min_gap_us)
    print(f"span {r['span_ms']:.1f} ms, GPU busy {r['busy_ms']:.1f} ms, idle {r['idle_ms']:.1f} ms "
          f"({100 * r['idle_ms'] / r['span_ms']:.1f} %)")
    print(f"idle in gaps of >= {args.min_gap_us:g} us, by the host operation that launched the next kernel:")
    for name, ms in list(r["idle_by_host_op_ms"].items())[:args.top]:
        print(f"  {ms:9.3f} ms  {r['gaps_by_host_op'][name]:5d} gaps  {name[:100]}")
    print("largest gaps:")
    for us, where, kernel in r["largest_gaps"][:args.top]:
        print(f"  {us / 1000:8.3f} ms  before {kernel[:60]}  (host: {where[:60]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
