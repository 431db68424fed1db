"""One full turn under a hard GPU memory cap: the "8 GB" (fp8 + phase) and "16 GB" (bf16 + phase) claims.

    python bench/capped_turn.py --json $OUT/capped.json                       (GPU: both caps, official size)
    python bench/capped_turn.py --json /tmp/capped.json --dry                 (CPU: the same code at tiny widths)

Random weights at the official dimensions are made on the CPU (bench/models.full_parts), the engine moves each
stage to the GPU itself (offload="phase"), and `torch.cuda.set_per_process_memory_fraction` makes any
allocation past the cap fail. Per configuration: a warm-up turn, then a timed one (1024 x 1024, 50 steps, CFG 2);
recorded: torch.cuda.max_memory_allocated, the turn's time, and the checks (finite image, peak <= cap). Exit 1 when
a check fails. Without CUDA (--dry) nothing is capped and the figures are only the harness's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import models  # noqa: E402
from wegen.engine import WeGenEngine  # noqa: E402

CONFIGS = (("fp8 + phase", "fp8_e4m3fn", "phase", 8.0), ("bf16 + phase", "default", "phase", 16.0))
PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def run_config(args, label, weight_dtype, offload, cap_gb) -> dict:
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    parts = models.full_parts(args.workdir, "cpu", dtype, mini=args.dry)  # weights start in RAM
    if cuda:
        total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2 ** 30 / total), torch.device(args.device))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
    e = WeGenEngine(parts, device=args.device, dtype="auto", offload=offload, weight_dtype=weight_dtype)
    side = args.side or (256 if args.dry else 1024)
    kw = dict(seed=0, steps=args.steps, cfg=2.0, width=side, height=side)
    e.generate(PROMPT, **kw)  # warm-up: first moves, kernel selection
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = e.generate(PROMPT, **kw)[0]
    if cuda:
        torch.cuda.synchronize()
    turn_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(args.device) / 2 ** 30 if cuda else None
    checks = {"finite image": bool(torch.isfinite(image).all()),
              f"peak <= {cap_gb:g} GiB": peak is None or peak <= cap_gb}
    row = {"config": label, "weight_dtype": weight_dtype, "offload": offload, "cap_gib": cap_gb if cuda else None,
           "peak_gib": peak, "turn_s": turn_s, "side": side, "steps": args.steps, "checks": checks,
           "passed": all(checks.values()), "dry": args.dry}
    del e, parts
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(args.device))
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--dry", action="store_true", help="tiny widths, 2 steps (the harness on a CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--side", type=int, default=None)
    p.add_argument("--only", default=None, help="'fp8' or 'bf16': one configuration")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wegen-bench"))
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.steps = args.steps or (2 if args.dry else 50)
    if not args.device.startswith("cuda") and not args.dry:
        p.error("the capped turn needs a CUDA GPU; --dry runs its code at tiny widths on the CPU")
    rows = []
    for cfg in CONFIGS:
        if args.only and not cfg[0].startswith(args.only):
            continue
        rows.append(run_config(args, *cfg))
        print(json.dumps(rows[-1]), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "torch": torch.__version__, "turns": rows}, f, indent=1)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
