"""Peak memory and time of one `explain` call on a batch of long texts, split into memory-sized
calls (`api.explain`'s default) against one call on the whole batch, side by side.

Each (method, mode) runs in a fresh process on the embedded text model (MiniLM-L6 shapes) in
float64: B texts of T tokens (random ids, no padding), one warm-up call, then the kernel's peak RSS
(VmHWM, reset before the call) above the RSS before the call, and the call's CPU time.
"One call" is `api.rows_per_call` replaced by the batch length. The maps of both modes are
compared (largest difference relative to the map's scale).

    .venv/bin/python scripts/bench_text_memory.py [--batch 8] [--tokens 512]
        [--methods attnlrp transformer_attribution bt_h integrated_gradients] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_explainers import _status_kb  # noqa: E402  (one reader of /proc/self/status)

METHODS = ["attnlrp", "transformer_attribution", "bt_h", "integrated_gradients"]


def child(method: str, mode: str, batch: int, tokens: int, out: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transexplain
    import transexplain.api as api
    from transexplain.models.text import load_text_model

    model, _ = load_text_model("embedded")
    if mode == "one call":
        api.rows_per_call = lambda adapter, x: len(x)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    transexplain.explain(model, x, method, target=1)  # warm-up: the float64 copy and one-off allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    t0 = time.process_time()
    res = transexplain.explain(model, x, method, target=1)
    seconds = time.process_time() - t0
    peak = _status_kb("VmHWM")
    torch.save(res.token_map, out)
    print(json.dumps({"peak_gb": (peak - base) / 2**20, "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args._child:
        method, mode, out = args._child
        child(method, mode, args.batch, args.tokens, out)
        return
    import tempfile

    print(f"embedded text model, float64, {args.batch} texts x {args.tokens} tokens, {args.threads} thread(s)")
    print("| method | one call: peak GB | split: peak GB | memory ratio | one call: s | split: s | time ratio | max diff / scale |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            got = {}
            for mode in ("one call", "split"):
                out = os.path.join(tmp, f"{method}-{mode.replace(' ', '_')}.pt")
                r = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--tokens", str(args.tokens),
                                    "--threads", str(args.threads), "--_child", method, mode, out],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{method} ({mode}) failed:\n{r.stderr[-2000:]}")
                got[mode] = (json.loads(r.stdout.strip().splitlines()[-1]), torch.load(out))
            (a, ma), (b, mb) = got["one call"], got["split"]
            diff = ((ma - mb).abs().max() / ma.abs().max().clamp(min=1e-300)).item()
            print(f"| {method} | {a['peak_gb']:.2f} | {b['peak_gb']:.2f} | {a['peak_gb'] / max(b['peak_gb'], 1e-9):.2f} "
                  f"| {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
