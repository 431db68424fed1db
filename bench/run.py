"""bench/run.py: every stage timed as the stock path (bench/stock.py) and as the engine's default path
(the figures: bench/figures.py).

    python bench/run.py --size tiny --device cpu --json bench/results/cpu-tiny.json
    python bench/run.py --size full --device cuda --json $OUT/gpu.json      (GPU machine: bench/gpu.sh)

Stock and ours run in the same process on the same weights, interleaved, after one warm-up call
each; each figure is the median of --repeats timings (CUDA events on a GPU, perf_counter on a CPU).
The JSON ({"device", "figures": [{"name", "stock_s", "ours_s", "ratio", ...}], "checks"}) and a
markdown table beside it are rewritten after every figure, so a run cut short still leaves its
figures. ratio = stock / ours (above 1: ours is faster, or smaller for peak memory, in GB).

Every figure also checks that both paths computed the same thing within a stated tolerance (figures.TOL); a
failed check is recorded and makes the run exit 1. Each timed row gets a verdict from its paired, interleaved
runs: "faster" / "slower" when every run's stock/ours ratio is on the same side of 1, otherwise "same arithmetic
(within noise)" on a CPU ("within noise" on a GPU). The machine's own noise (the spread of 9 timings of a fixed
matmul) is measured first and written with the results.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import models, stock  # noqa: E402
from bench.figures import FIGURE_FUNCS, FIGURES, ORDER, PROMPT, TARGETS, fmt  # noqa: E402,F401
from wegen import fastpath, loading, prompting  # noqa: E402
from wegen.engine import WeGenEngine  # noqa: E402

FULL_MIN_GPU_GB = 40
_fmt = fmt


# Setup ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["tiny", "full", "full-mini"], default="tiny",
                   help="tiny: the tiny checkpoint; full: random weights at the official dimensions (GPU); "
                        "full-mini: the full-size code path at tiny dimensions (checks the harness on a CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", required=True, help="output JSON (a .md table is written beside it)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path and figure (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per path before timing")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (release: 50)")
    p.add_argument("--image-size", type=int, default=None, help="square output side (default: 1024 full, "
                                                                "128 tiny)")
    p.add_argument("--sweep-n", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 64 px, 1 repeat, no warm-up")
    p.add_argument("--only", default=None, help="comma-separated figure numbers 1..8 (default: all)")
    p.add_argument("--compile", choices=fastpath.COMPILE_MODES, default="off", help="torch.compile the UNet and the decode layer")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting figures after this many seconds; "
                                                                 "repeats shrink to fit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="CPU runs: wall-clock, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1). GPU runs always use CUDA events")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wegen-bench"))
    p.add_argument("--tiny-dir", default=None, help="an existing tiny checkpoint (official layout) to reuse")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # peak-memory child: stock | ours
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.image_size, args.repeats, args.warmup = 2, args.image_size or 64, 1, 0
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or args.sweep_n < 1:
        p.error("--repeats, --steps and --sweep-n must be >= 1 and --warmup >= 0")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def check_full_size(device: str):
    """Refuse --size full where it cannot run: it needs a CUDA GPU with room for 27.5 GB of bf16 weights."""
    if not device.startswith("cuda"):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        raise SystemExit(f"error: --size full runs the official dimensions (27.5 GB of bf16 weights plus a stock "
                         f"UNet/VAE copy) on a CUDA GPU with >= {FULL_MIN_GPU_GB} GB; this is a CPU run on a machine "
                         f"with {ram:.0f} GB RAM. Use --size tiny here, or bench/gpu.sh on a GPU machine.")
    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU")
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2 ** 30
    if total < FULL_MIN_GPU_GB:
        raise SystemExit(f"error: --size full needs a GPU with >= {FULL_MIN_GPU_GB} GB; this one has {total:.0f} GB")


class Bench:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.figures, self.checks = [], []
        self.noise = machine_noise()
        self.reserve_s = 0.0  # budget kept for the figures still to come
        fastpath.configure(compile=args.compile)
        os.makedirs(args.workdir, exist_ok=True)
        self.log(f"setup: size={args.size} device={self.device} torch={torch.__version__} threads="
                 f"{torch.get_num_threads()}")
        self.random_weights = args.size in ("full", "full-mini")
        if self.random_weights:
            if args.size == "full":
                check_full_size(args.device)
            self.official = self.converted = None
            mini = args.size == "full-mini"
            dtype = torch.bfloat16 if self.cuda else torch.float32
            parts = models.full_parts(args.workdir, self.device, dtype, mini=mini)
            self.engine = WeGenEngine(parts, device=args.device, dtype="auto")
        else:
            self.official, self.converted = self._tiny_paths()
            self.engine = WeGenEngine(loading.load_parts(self.official), device=args.device, dtype="auto")
        self.sm = stock.from_engine(self.engine)
        e = self.engine
        self.side = args.image_size or (e.decoder_cfg.default_size if args.size == "full" else 128)
        self.ids = self.prompt_ids(PROMPT)
        self.log(f"models ready: LLM {models.param_bytes(e.mllm) / 1e9:.2f} GB, UNet "
                 f"{models.param_bytes(e.unet) / 1e9:.2f} GB, {e.dtype}; image {self.side}px, {args.steps} steps")

    def _tiny_paths(self):
        if self.args.tiny_dir:
            official = self.args.tiny_dir
            tag = hashlib.sha1(os.path.realpath(official).encode()).hexdigest()[:10]
            converted = os.path.join(self.args.workdir, f"tiny-converted-{tag}")
            if not os.path.isfile(os.path.join(converted, loading.CONVERTED_CONFIG)):
                loading.convert(official, converted)
            return official, converted
        return models.tiny_checkpoints(self.args.workdir)

    def prompt_ids(self, prompt: str, history=None, task="generate") -> list[int]:
        turns = list(history or []) + [prompting.Turn(user=prompt)]
        return prompting.prompt_ids(self.engine.tokenizer, turns, self.engine.mllm_cfg.n_query, task,
                                    force_image=True)

    def log(self, msg: str):
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp} +{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    # Timing ----------------------------------------------------------------------------------------

    def timed(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        clock = time.process_time if self.args.clock == "process" else time.perf_counter
        start = clock()
        fn()
        return clock() - start

    def left_s(self) -> float:
        return float("inf") if self.args.budget_s is None else self.args.budget_s - (time.perf_counter() - self.t0)

    def figure(self, name: str, stock_fn, ours_fn, note: str = "", repeats: int | None = None,
               label: str | None = None) -> dict:
        """Warm up (first calls capture graphs / compile), then interleave stock and ours; record medians."""
        repeats = repeats or self.args.repeats
        warm = {"stock": [], "ours": []}
        for _ in range(max(1, self.args.warmup)):
            warm["stock"].append(self.timed(stock_fn))
            warm["ours"].append(self.timed(ours_fn))
        if self.args.warmup == 0:  # quick: the warm-up calls are the timings
            times = warm
        else:
            pair = warm["stock"][-1] + warm["ours"][-1]
            n = repeats
            if self.args.budget_s is not None:  # shrink to what the budget still holds
                n = max(1, min(repeats, int(max(0.0, self.left_s() - self.reserve_s) // max(pair, 1e-9))))
            times = {"stock": [], "ours": []}
            for k in range(n):  # interleaved, alternating which path goes first
                order = (("stock", stock_fn), ("ours", ours_fn)) if k % 2 == 0 else \
                    (("ours", ours_fn), ("stock", stock_fn))
                for path, fn in order:
                    times[path].append(self.timed(fn))
        s, o = statistics.median(times["stock"]), statistics.median(times["ours"])
        row = {"name": name, "stock_s": s, "ours_s": o, "ratio": (s / o) if s and o else None, "unit": "s",
               "repeats": len(times["ours"]), "stock_times": times["stock"], "ours_times": times["ours"],
               "warmup_times": warm, "note": note, "verdict": verdict(times, self.cuda)}
        if label:
            row["label"] = label
        return self.add(row)

    def add(self, row: dict) -> dict:
        self.figures = [f for f in self.figures if f["name"] != row["name"]] + [row]
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "n/a"
        self.log(f"{row['name']}: stock {_fmt(row['stock_s'], row['unit'])}, ours {_fmt(row['ours_s'], row['unit'])}"
                 f" -> {ratio} [{row.get('verdict', '')}] {row.get('note', '')}")
        self.write()
        return row

    def targets(self) -> list:
        """Issue 5's targets against this run's figures (meaningful for --size full on one GPU only)."""
        if self.args.size != "full":
            return []
        out = []
        for f in self.figures:
            limit = TARGETS.get(f["name"])
            if limit is not None and f.get("ours_s") is not None:
                out.append({"name": f["name"], "ours": f["ours_s"], "target": limit, "unit": f["unit"],
                            "met": f["ours_s"] <= limit})
        return out

    def annotate(self, row: dict, text: str):
        """Append to a figure's note what is only known after it ran (which fast path was taken)."""
        row["note"] = f"{row['note']}; {text}" if row.get("note") else text
        self.write()

    def skip(self, name: str, why: str):
        return self.add({"name": name, "stock_s": None, "ours_s": None, "ratio": None, "unit": "s", "repeats": 0,
                  "note": f"skipped: {why}"})

    def check(self, name: str, got: torch.Tensor, ref: torch.Tensor, metric: str, tolerance: float):
        """Record whether two paths computed the same thing: metric "max" = max |got - ref| / max |ref|,
        "mean" = mean |got - ref| (pixels); passed = finite, same shape and value <= tolerance."""
        got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
        same_shape = got.shape == ref.shape
        diff = (got - ref).abs() if same_shape else torch.tensor([float("inf")])
        scale = float(ref.abs().max())
        value = float(diff.max()) / (scale or 1.0) if metric == "max" else float(diff.mean())
        finite = bool(torch.isfinite(got).all())
        passed = same_shape and finite and value <= tolerance
        self.checks.append({"name": name, "metric": "max rel" if metric == "max" else "mean abs", "value": value,
                            "tolerance": tolerance, "passed": passed, "max_abs_diff": float(diff.max()),
                            "ref_max_abs": scale, "finite": finite})
        self.log(f"check {name}: {metric} {value:.3g} (tolerance {tolerance:.3g}) {'ok' if passed else 'FAILED'}")
        self.write()

    # Output ----------------------------------------------------------------------------------------

    def write(self):
        a, e = self.args, self.engine
        doc = {"device": _device_name(self.device), "size": a.size, "created": datetime.datetime.now().isoformat(
            timespec="seconds"), "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "clock": "cuda events" if self.cuda else a.clock, "dtype": str(e.dtype).replace("torch.", ""),
               "image_size": self.side, "steps": a.steps, "repeats": a.repeats, "quick": a.quick,
               "compile": a.compile, "fastpath": fastpath.describe(e.mllm, e.unet), "machine_noise": self.noise,
               "load_average": os.getloadavg(),
               "versions": _versions(), "figures": self.figures, "checks": self.checks,
               "targets": self.targets()}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        tmp = a.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, a.json)
        with open(os.path.splitext(a.json)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(markdown_table(doc))


    def run_child(self, kind: str) -> dict:
        """The CPU peak-memory figure's fresh process for one path (stock: official layout; ours: converted)."""
        a = self.args
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--size", "tiny", "--device", a.device,
               "--json", os.path.join(a.workdir, f"child-{kind}.json"), "--steps", str(a.steps), "--image-size",
               str(self.side), "--workdir", a.workdir, "--tiny-dir", self.official if kind == "stock" else self.converted]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"peak-memory child ({kind}) failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(times: dict, cuda: bool) -> str:
    """From the paired, interleaved runs: faster / slower only when every run's stock/ours ratio agrees."""
    pairs = [s / o for s, o in zip(times["stock"], times["ours"]) if o]
    if len(pairs) < 3:
        return "n/a (fewer than 3 runs)"
    lo, hi = min(pairs), max(pairs)
    if lo > 1:
        return f"faster in every run ({lo:.2f}x-{hi:.2f}x)"
    if hi < 1:
        return f"slower in every run ({lo:.2f}x-{hi:.2f}x)"
    return f"{'within noise' if cuda else 'same arithmetic (within noise)'} ({lo:.2f}x-{hi:.2f}x)"


def machine_noise(runs: int = 9) -> dict:
    """This machine's timing noise: 9 timings of one fixed matmul workload; spread = (max - min) / median."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {"median_s": med, "spread": (max(times) - min(times)) / med, "runs": runs}


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> dict:
    out = {}
    for name in ("transformers", "diffusers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def markdown_table(doc: dict) -> str:
    lines = [f"Device: {doc['device']} | size: {doc['size']} | {doc['dtype']} | {doc['image_size']}px, "
             f"{doc['steps']} steps | torch {doc['torch']} | threads {doc['threads']} | clock {doc['clock']} | "
             f"fast path: "
             f"{', '.join(f'{k} {v}' for k, v in doc['fastpath'].items())}"
             + (f" | machine noise {doc['machine_noise']['spread']:.0%} (spread of 9 timings of one matmul)"
                if doc.get("machine_noise") else ""), "",
             "| figure | stock | ours | ratio | runs | verdict | notes |", "|---|---|---|---|---|---|---|"]
    for f in doc["figures"]:
        ratio = f"{f['ratio']:.2f}x" if f.get("ratio") else "n/a"
        lines.append(f"| {f.get('label', f['name'])} | {_fmt(f['stock_s'], f['unit'])} | {_fmt(f['ours_s'], f['unit'])} "
                     f"| {ratio} | {f.get('repeats', '')} | {f.get('verdict', '')} | {f.get('note', '')} |")
    if doc.get("targets"):
        lines += ["", "| target | ours | at most | met |", "|---|---|---|---|"]
        for t in doc["targets"]:
            lines.append(f"| {t['name']} | {_fmt(t['ours'], t['unit'])} | {_fmt(t['target'], t['unit'])} "
                         f"| {'yes' if t['met'] else 'NO'} |")
    if doc["checks"]:
        lines += ["", "| check (same work, both paths) | metric | value | tolerance | passed |", "|---|---|---|---|---|"]
        for c in doc["checks"]:
            lines.append(f"| {c['name']} | {c.get('metric', 'max abs')} | {c.get('value', c['max_abs_diff']):.3g} "
                         f"| {c.get('tolerance', float('nan')):.3g} | {'yes' if c.get('passed', True) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    previous = fastpath.configure()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.child:
            print(json.dumps(child_peak(args)))
            return 0
        failed = run_figures(args)
    finally:  # in-process callers (tests) get their settings back
        torch.set_num_threads(threads)
        fastpath.configure(**dataclasses.asdict(previous))
    if failed:
        print(f"error: {len(failed)} check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_figures(args) -> list[str]:
    """Every wanted figure; returns the names of the checks that failed (and of figures that broke)."""
    b = Bench(args)
    broken = []
    wanted = set(range(8)) if not args.only else {int(x) - 1 for x in args.only.split(",")}
    order = [i for i in ORDER if i in wanted]
    for k, i in enumerate(order):
        name = FIGURES[i]
        b.reserve_s = 25.0 * (len(order) - k - 1)
        if b.left_s() < 30:
            b.skip(name, f"time budget of {args.budget_s:.0f} s spent")
            continue
        b.log(f"figure {i + 1}: {name}")
        try:
            FIGURE_FUNCS[i](b)
        except torch.cuda.OutOfMemoryError as err:
            b.skip(name, f"out of GPU memory ({str(err).splitlines()[0]})")
            fastpath.release(b.engine.mllm, b.engine.unet)
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the others (one GPU call)
            traceback.print_exc()
            b.skip(name, f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            broken.append(f"figure {name} broke")
    b.write()
    with open(args.json, encoding="utf-8") as f:
        print(markdown_table(json.load(f)), flush=True)
    return broken + [c["name"] for c in b.checks if not c["passed"]]


def child_peak(args) -> dict:
    """In a fresh process: RSS growth from just before loading to the end of one full turn, and an 8 x 8 mean-pooled
    thumbnail of the image (the parent checks that both paths drew the same picture)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: F401 - imported
    from transformers import DynamicCache, LlamaForCausalLM  # noqa: F401 - before the baseline, as in a server

    baseline = _rss_kb()
    side = args.image_size
    if args.child == "stock":  # --tiny-dir: the official layout
        parts, mods = stock.load_official(args.tiny_dir, torch.device(args.device), torch.float32)
        sm = stock.from_modules(parts, mods, args.device, torch.float32)
        ids = prompting.prompt_ids(mods["tokenizer"], [prompting.Turn(PROMPT)], parts.mllm_cfg.n_query, "generate",
                                   force_image=True)
        image = stock.full_turn(sm, ids, 0, args.steps, 2.0, side, side)
    else:  # --tiny-dir: the converted layout
        e = WeGenEngine(loading.load_parts(args.tiny_dir), device=args.device, dtype="auto")
        image = e.generate(PROMPT, seed=0, steps=args.steps, cfg=2.0, width=side, height=side)[0]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    thumb = torch.nn.functional.adaptive_avg_pool2d(image.permute(0, 3, 1, 2).float(), 8)
    return {"peak_gb": (peak_kb - baseline) / 2 ** 20, "baseline_gb": baseline / 2 ** 20, "thumb": thumb.tolist()}


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
