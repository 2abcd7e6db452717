"""GPU check of DOC_MASK's flex-attention path against the masked-SDPA path, forward and backward.

    python bench/flex_check.py [--rows 8] [--seq 2048]

The first GPU run of DOC_MASK=1 (2026-12-03, PyTorch 2.11) lost its loss to NaN at step 3 while the same
commit without the mask trained; flex has no CPU backward, so the tests cannot see its gradients. This
prints, per document layout and per way of building the mask, the largest error of the output and of
dq/dk/dv against an fp32 SDPA reference with the same mask, and whether any value is not finite. One JSON
line per case. Ways: `train_gpt` (the tile mask built eagerly by documents(), the compiled attention taking
it as an input: what the script does since that run), `in_graph` (the tile mask built inside the compiled
graph: what that run did, wrong on mixed layouts), and `create_block_mask` (PyTorch's own builder from the
element rule, eager).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402


def layouts(rows: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """(rows, seq) token ids whose BOS_ID tokens start documents, in a few shapes of layout."""
    def with_starts(starts_per_row):
        ids = torch.full((rows, seq), 5, dtype=torch.int64)
        for r, starts in enumerate(starts_per_row):
            ids[r, starts] = tg.BOS_ID
        return ids
    mean_docs = []
    for _ in range(rows):  # document lengths like the proxy's (mean ~600 tokens)
        lengths = (torch.distributions.Exponential(1 / 600).sample((40,)).long() + 8).tolist()
        starts, at = [], int(torch.randint(0, 400, (1,), generator=gen))
        for n in lengths:
            if at >= seq:
                break
            starts.append(at)
            at += n
        mean_docs.append(starts)
    return {
        "proxy_like": with_starts(mean_docs),
        "no_bos": with_starts([[] for _ in range(rows)]),
        "bos_on_tiles": with_starts([list(range(0, seq, tg.FLEX_BLOCK)) for _ in range(rows)]),
        "bos_everywhere_short": with_starts([list(range(0, seq, 37)) for _ in range(rows)]),
    }


def run_case(q, k, v, grad_out, doc, attention) -> dict:
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, doc)
    out.backward(grad_out)
    return {"out": out.detach().float(), "dq": q.grad.float(), "dk": k.grad.float(), "dv": v.grad.float()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("flex_check needs a CUDA GPU (flex attention has no CPU backward)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dev, H, Hkv, D = "cuda", 8, 4, 64
    compiled_attention = torch.compile(
        lambda q, k, v, docs: tg.document_attention(q, k, v, docs, flex=torch.compiler.is_compiling()), dynamic=False)
    compiled_in_graph = torch.compile(  # the mask built inside the graph: the NaN run's way
        lambda q, k, v, doc: tg.document_attention(q, k, v, tg.Documents(doc, tg.document_block_mask(doc)),
                                                   flex=torch.compiler.is_compiling()), dynamic=False)
    compiled_flex = torch.compile(flex_attention, dynamic=False)

    def script_way(q, k, v, doc):  # documents() builds the tile mask eagerly; the compiled attention takes it
        return compiled_attention(q, k, v, tg.Documents(doc, tg.document_block_mask(doc)))

    def reference_mask(q, k, v, doc):  # PyTorch's own mask builder from the element rule
        def rule(b, h, qi, ki):
            return (qi >= ki) & (doc[b, qi] == doc[b, ki])
        mask = create_block_mask(rule, doc.size(0), None, doc.size(1), doc.size(1), device=dev)
        out = compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    ways = {"train_gpt": script_way, "in_graph": compiled_in_graph, "create_block_mask": reference_mask}
    for layout, ids in layouts(args.rows, args.seq, gen).items():
        doc = tg.document_ids(ids.to(dev))
        q = torch.randn(args.rows, args.seq, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(args.rows, args.seq, Hkv, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(args.rows, args.seq, Hkv, D, device=dev, dtype=torch.bfloat16)
        grad_out = torch.randn(args.rows, args.seq, H, D, device=dev, dtype=torch.bfloat16)
        ref = run_case(q.float(), k.float(), v.float(), grad_out.float(), doc,
                       lambda q, k, v, doc: tg.document_attention(q, k, v, tg.Documents(doc, None), flex=False))
        for way, attention in ways.items():
            row = {"layout": layout, "way": way}
            try:
                got = run_case(q, k, v, grad_out, doc, attention)
                for key in ("out", "dq", "dk", "dv"):
                    row[f"{key}_max_err"] = round(float((got[key] - ref[key]).abs().max()), 5)
                    row[f"{key}_ref_max"] = round(float(ref[key].abs().max()), 3)
                    row[f"{key}_finite"] = bool(torch.isfinite(got[key]).all())
            except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
