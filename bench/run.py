"""bench/run.py: every stage timed as the stock path (bench/stock.py) and as the engine's default path.

    python bench/run.py --size tiny --device cpu --json bench/results/cpu-tiny.json
    python bench/run.py --size full --device cuda --json $OUT/gpu.json      (GPU machine: bench/gpu.sh)

Stock and ours run in the same process on the same weights, interleaved, after one warm-up call
each; each figure is the median of --repeats timings (CUDA events on a GPU, perf_counter on a CPU).
The JSON ({"device", "figures": [{"name", "stock_s", "ours_s", "ratio", ...}], "checks"}) and a
markdown table beside it are rewritten after every figure, so a run cut short still leaves its
figures. ratio = stock / ours (above 1: ours is faster, or smaller for peak memory, in GB).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
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
from wegen import decoder, fastpath, loading, mllm, prompting  # noqa: E402
from wegen.engine import WeGenEngine  # noqa: E402

FIGURES = ("image-token decode (B=1)", "sweep of 8 (B=8 vs 8 x B=1)", "UNet 50 steps", "VAE decode", "full turn",
           "chat turn 5", "load", "peak memory")
PROMPT = "a lighthouse on a cliff at sunset, oil painting"
SWEEP_PROMPTS = ("a red fox in a snowy forest", "a castle on a mountain at night", "a cat reading a book",
                 "an owl on a tree", "a boat on a calm river at sunrise", "a robot in a garden, watercolor",
                 "a city street in the rain, cinematic lighting", "a golden dragon over the ocean")
CHAT_MESSAGES = ("a house near a river", "make the sky more purple", "add a small boat on the river",
                 "change the house to a castle", "make it night with a bright moon")
FULL_MIN_GPU_GB = 40
# Issue 5's targets at the official dimensions on one H100/H200: figure -> most "ours" may take (s or GB).
TARGETS = {"image-token decode (B=1)": 0.35, "full turn": 2.0, "sweep of 8 (B=8 vs 8 x B=1)": 12.0,
           "peak memory": 16.0}


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
    p.add_argument("--direct-sweep", action="store_true", help="full size: time the stock sweep itself "
                                                               "(default: 8 x the stock full turn)")
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

    def figure(self, name: str, stock_fn, ours_fn, note: str = "", stock_s: float | None = None,
               repeats: int | None = None) -> dict:
        """Warm up (first calls capture graphs / compile), then interleave stock and ours; record medians.

        stock_fn=None: stock_s is given (a derived figure) and only ours is timed.
        """
        repeats = repeats or self.args.repeats
        warm = {"stock": [], "ours": []}
        for _ in range(max(1, self.args.warmup)):
            if stock_fn is not None:
                warm["stock"].append(self.timed(stock_fn))
            warm["ours"].append(self.timed(ours_fn))
        if self.args.warmup == 0:  # quick: the warm-up calls are the timings
            times = warm
        else:
            pair = (warm["stock"][-1] if stock_fn else 0.0) + warm["ours"][-1]
            n = repeats
            if self.args.budget_s is not None:  # shrink to what the budget still holds
                n = max(1, min(repeats, int(max(0.0, self.left_s() - self.reserve_s) // max(pair, 1e-9))))
            times = {"stock": [], "ours": []}
            for k in range(n):  # interleaved, alternating which path goes first
                order = (("stock", stock_fn), ("ours", ours_fn)) if k % 2 == 0 else \
                    (("ours", ours_fn), ("stock", stock_fn))
                for path, fn in order:
                    if fn is not None:
                        times[path].append(self.timed(fn))
        s = statistics.median(times["stock"]) if times["stock"] else stock_s
        o = statistics.median(times["ours"])
        row = {"name": name, "stock_s": s, "ours_s": o, "ratio": (s / o) if s and o else None, "unit": "s",
               "repeats": len(times["ours"]), "stock_times": times["stock"], "ours_times": times["ours"],
               "warmup_times": warm, "note": note}
        return self.add(row)

    def add(self, row: dict) -> dict:
        self.figures = [f for f in self.figures if f["name"] != row["name"]] + [row]
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "n/a"
        self.log(f"{row['name']}: stock {_fmt(row['stock_s'], row['unit'])}, ours {_fmt(row['ours_s'], row['unit'])}"
                 f" -> {ratio} {row.get('note', '')}")
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

    def check(self, name: str, got: torch.Tensor, ref: torch.Tensor, note: str = ""):
        got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
        diff = float((got - ref).abs().max())
        scale = float(ref.abs().max())
        self.checks.append({"name": name, "max_abs_diff": diff, "ref_max_abs": scale,
                            "rel": diff / scale if scale else None, "finite": bool(torch.isfinite(got).all()),
                            "note": note})
        self.log(f"check {name}: max abs diff {diff:.3g} (ref max {scale:.3g})")

    # Output ----------------------------------------------------------------------------------------

    def write(self):
        a, e = self.args, self.engine
        doc = {"device": _device_name(self.device), "size": a.size, "created": datetime.datetime.now().isoformat(
            timespec="seconds"), "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "clock": "cuda events" if self.cuda else a.clock, "dtype": str(e.dtype).replace("torch.", ""),
               "image_size": self.side, "steps": a.steps, "repeats": a.repeats, "quick": a.quick,
               "compile": a.compile, "fastpath": fastpath.describe(e.mllm, e.unet),
               "versions": _versions(), "figures": self.figures, "checks": self.checks,
               "targets": self.targets()}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        tmp = a.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, a.json)
        with open(os.path.splitext(a.json)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(markdown_table(doc))


def _fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "GB":
        return f"{v:.2f} GB"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


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
             f"{', '.join(f'{k} {v}' for k, v in doc['fastpath'].items())}", "",
             "| figure | stock | ours | ratio | runs | notes |", "|---|---|---|---|---|---|"]
    for f in doc["figures"]:
        ratio = f"{f['ratio']:.2f}x" if f.get("ratio") else "n/a"
        lines.append(f"| {f['name']} | {_fmt(f['stock_s'], f['unit'])} | {_fmt(f['ours_s'], f['unit'])} | {ratio} "
                     f"| {f.get('repeats', '')} | {f.get('note', '')} |")
    if doc.get("targets"):
        lines += ["", "| target (issue 5) | ours | at most | met |", "|---|---|---|---|"]
        for t in doc["targets"]:
            lines.append(f"| {t['name']} | {_fmt(t['ours'], t['unit'])} | {_fmt(t['target'], t['unit'])} "
                         f"| {'yes' if t['met'] else 'NO'} |")
    if doc["checks"]:
        lines += ["", "| check | max abs diff | reference max | finite |", "|---|---|---|---|"]
        for c in doc["checks"]:
            lines.append(f"| {c['name']} | {c['max_abs_diff']:.3g} | {c['ref_max_abs']:.3g} | {c['finite']} |")
    return "\n".join(lines) + "\n"


# Figures -------------------------------------------------------------------------------------------

def fig_decode(b: Bench):
    e, ids = b.engine, b.ids

    def ours():
        return e.generate_tokens([ids], [None], mllm.DecodeSettings(), [0], None)[0].features.float().cpu()

    row = b.figure(FIGURES[0], lambda: stock.decode_image_tokens(b.sm, ids), ours,
                   note=f"{len(ids)}-token prompt + 65 image steps")
    b.annotate(row, f"ours: {fastpath.describe(e.mllm)['decode']}")
    with fastpath.settings(enabled=False):
        plain = e.generate_tokens([ids], [None], mllm.DecodeSettings(), [0], None)[0].features.float().cpu()
    b.check("decode: ours vs plain transformers loop", ours(), plain)
    b.check("decode: ours vs stock", ours(), stock.decode_image_tokens(b.sm, ids))
    if not b.cuda:  # the CUDA-only static cache, run eagerly on the CPU, against the plain loop
        with fastpath.settings(static_on_cpu=True):
            b.check("decode: static cache (eager, CPU) vs plain", ours(), plain)
        fastpath.release(e.mllm)
    return row


def fig_unet(b: Bench):
    e, a = b.engine, b.args
    feats = _features(b, 1)

    def ours():
        with torch.inference_mode():
            return decoder.generate(e.unet, e.vae, e.scheduler, e.decoder_cfg, feats, [0], steps=a.steps,
                                    guidance_scale=2.0, width=b.side, height=b.side, output="latents")

    row = b.figure(FIGURES[2], lambda: stock.denoise(b.sm, feats, 0, a.steps, 2.0, b.side, b.side), ours,
                   note=f"B=1, CFG 2 (batch 2), {b.side}px")
    d = fastpath.describe(unet=e.unet)
    b.annotate(row, f"ours: {_layout(e.unet)}, {d['unet']}, compile {d['compile']}, uncond cross-attention "
                    f"skipped in {d['zero_context_skip']} layers")
    b.check("UNet latents: ours vs stock", ours(), stock.denoise(b.sm, feats, 0, a.steps, 2.0, b.side, b.side))
    b.latents = ours()
    return row


def _layout(module) -> str:
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return "channels-last" if conv.weight.is_contiguous(memory_format=torch.channels_last) else "NCHW"


def fig_vae(b: Bench):
    e = b.engine
    latents = getattr(b, "latents", None)
    if latents is None:
        shape = (1, e.decoder_cfg.latent_channels, b.side // 8, b.side // 8)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(b.device)

    def ours():
        with torch.inference_mode():
            return decoder.decode_latents(e.vae, e.decoder_cfg, latents)

    row = b.figure(FIGURES[3], lambda: stock.vae_decode(b.sm, latents), ours,
                   note=f"stock fp32; ours {str(e.vae.dtype).replace('torch.', '')}, {_layout(e.vae)}")
    b.check("VAE pixels: ours vs stock fp32", ours(), stock.vae_decode(b.sm, latents))
    return row


def fig_full_turn(b: Bench):
    e, a = b.engine, b.args

    def ours():
        return e.generate(PROMPT, seed=0, steps=a.steps, cfg=2.0, width=b.side, height=b.side)[0]

    return b.figure(FIGURES[4], lambda: stock.full_turn(b.sm, b.ids, 0, a.steps, 2.0, b.side, b.side), ours,
                    note="prompt -> image: image tokens + UNet + VAE")


def fig_sweep(b: Bench):
    e, a = b.engine, b.args
    prompts = [SWEEP_PROMPTS[i % len(SWEEP_PROMPTS)] for i in range(a.sweep_n)]
    rows = [b.prompt_ids(p) for p in prompts]
    seeds = list(range(a.sweep_n))

    def ours():
        cond = e.encode(prompts, seed=0)
        return e.decode_pixels(cond, seed=seeds, steps=a.steps, cfg=2.0, width=b.side, height=b.side)

    def stock_fn():
        return stock.sweep(b.sm, rows, seeds, a.steps, 2.0, b.side, b.side)

    if b.random_weights and not a.direct_sweep:
        turn = next((f for f in b.figures if f["name"] == FIGURES[4] and f.get("stock_s")), None)
        derived = a.sweep_n * turn["stock_s"] if turn else None
        row = b.figure(FIGURES[1], None, ours, stock_s=derived, repeats=min(a.repeats, 3),
                       note=f"{a.sweep_n} prompts x 1 seed; stock = {a.sweep_n} x the stock full turn "
                            f"(sequential B=1 runs); ours: one B={a.sweep_n} decode + one batched UNet/VAE")
    else:
        row = b.figure(FIGURES[1], stock_fn, ours, note=f"{a.sweep_n} prompts; stock: {a.sweep_n} sequential B=1 "
                                                        f"turns; ours: one B={a.sweep_n} decode + batched UNet/VAE")
    fastpath.release(e.unet)  # the batch-2K UNet graph is large; later figures use batch 2
    return row


def fig_chat(b: Bench):
    """Turn 5 of a chat: the MLLM side (history + 66 image tokens), where the reuse happens."""
    e = b.engine
    n = len(CHAT_MESSAGES) - 1
    history = [prompting.Turn(user=m, reply="Here's a painting.", reply_images=1) for m in CHAT_MESSAGES[:n]]
    ids5 = b.prompt_ids(CHAT_MESSAGES[n], history, task="chat")
    ids4 = b.prompt_ids(CHAT_MESSAGES[n - 1], history[:-1], task="chat")  # turn 4's prompt
    feats = _features(b, n, seed=5).float().cpu()  # stored features of the 4 generated images
    past = torch.rand(n, b.side, b.side, 3, generator=torch.Generator().manual_seed(6))  # their pixels
    if b.random_weights and e.parts.eva_state is None and not e.eva_built:
        b.log("building random EVA weights for the stock path")
        e.parts.eva_state = models.eva_state(e.eva_cfg, b.device, e.dtype)
    eva = e.eva  # the stock path re-encodes past images; ours reuses stored features
    settings = mllm.DecodeSettings()
    first = e.generate_tokens([ids4], [feats[:n - 1]], settings, [0], None, keep_prompt_cache=True)[0]
    common = next((i for i, (x, y) in enumerate(zip(ids4, ids5)) if x != y), min(len(ids4), len(ids5)))
    prefix = mllm.Prefix(first.prompt_cache, common)

    def ours():
        r = e.generate_tokens([ids5], [feats], settings, [0], None, prefix=prefix, keep_prompt_cache=True)[0]
        return r.features.float().cpu()

    def stock_fn():
        return stock.chat_turn(b.sm, eva, ids5, past)

    return b.figure(FIGURES[5], stock_fn, ours,
                    note=f"{len(ids5)}-token prompt with {n} past images; stock: EVA on {n} images + full prefill; "
                         f"ours: stored features, {common} cached tokens, prefills {len(ids5) - common}")


def fig_load(b: Bench):
    if b.random_weights:
        return fig_load_full(b)
    e = b.engine

    def stock_fn():
        return stock.load_official(b.official, b.device, e.dtype)

    def ours():
        return WeGenEngine(loading.load_parts(b.converted), device=b.args.device, dtype="auto")

    row = b.figure(FIGURES[6], stock_fn, ours, note="files -> modules, tokenizer, scheduler; stock: official "
                                                    "pickles (stage 2 + final), EVA built; ours: converted "
                                                    "safetensors (mmap), EVA lazy")
    files = {name: statistics.median(b.timed(lambda p=path: loading.load_parts(p)) for _ in range(b.args.repeats))
             for name, path in (("stock", b.official), ("ours", b.converted))}
    row["files_only_s"] = files
    b.annotate(row, f"reading the files alone: {_fmt(files['stock'], 's')} vs {_fmt(files['ours'], 's')} "
                    f"({files['stock'] / files['ours']:.2f}x)")
    return row


def fig_load_full(b: Bench):
    """Full size: the 8.7 GB EVA tower, official visual.pt pickle vs converted safetensors, to the GPU."""
    from safetensors.torch import save_file

    e = b.engine
    if not e.eva_built:
        if e.parts.eva_state is None:
            e.parts.eva_state = models.eva_state(e.eva_cfg, b.device, e.dtype)
        e.eva  # noqa: B018 - builds it
    state = {k: v.detach().to("cpu").contiguous() for k, v in e.eva.state_dict().items()}
    folder = os.path.join(b.args.workdir, "load-full")
    os.makedirs(folder, exist_ok=True)
    pickle_path, st_path = os.path.join(folder, "visual.pt"), os.path.join(folder, "eva.safetensors")
    gb = models.param_bytes(e.eva) / 1e9
    b.log(f"writing the EVA tower as a pickle and as safetensors ({gb:.2f} GB each)")
    torch.save(state, pickle_path)
    save_file(state, st_path)
    del state
    cfg = e.eva_cfg

    def stock_fn():
        sd = torch.load(pickle_path, map_location="cpu", weights_only=True)  # the release reads it whole
        return loading.materialize(loading.build_eva(cfg), sd, "eva", loading.LoadReport("x", "x")).to(b.device)

    def ours():
        sd = loading.load_safetensors(st_path)
        return loading.materialize(loading.build_eva(cfg), sd, "eva", loading.LoadReport("x", "x")).to(b.device)

    row = b.figure(FIGURES[6], stock_fn, ours, repeats=min(b.args.repeats, 3),
                   note=f"the EVA tower ({gb:.2f} GB) onto {b.device}: torch.load of visual.pt (the release) vs "
                        f"mmap'd safetensors (converted layout); page cache warm")
    for path in (pickle_path, st_path):
        os.remove(path)
    return row


def fig_peak(b: Bench):
    if b.cuda:
        return fig_peak_cuda(b)
    if b.args.quick:
        return b.skip(FIGURES[7], "--quick starts no child processes (a CPU figure needs a fresh process per path)")
    if b.random_weights:
        return b.skip(FIGURES[7], "random weights have no checkpoint for a fresh process to load; use --size tiny")
    results = {kind: _run_child(b, kind) for kind in ("stock", "ours")}
    s, o = results["stock"]["peak_gb"], results["ours"]["peak_gb"]
    return b.add({"name": FIGURES[7], "stock_s": s, "ours_s": o, "ratio": s / o if o else None, "unit": "GB",
                  "repeats": 1, "note": "peak RSS growth of a fresh process for load + one full turn; stock: official "
                                        "pickles, every module (EVA too); ours: converted mmap, EVA lazy",
                  "children": results})


def fig_peak_cuda(b: Bench):
    """Stock: every module on the GPU (the release). Ours: offload='phase' from a cold start."""
    e, sm, a = b.engine, b.sm, b.args
    if not e.eva_built:
        if e.parts.eva_state is None:
            e.parts.eva_state = models.eva_state(e.eva_cfg, b.device, e.dtype)
        e.eva  # noqa: B018 - the release keeps EVA on the GPU
    fastpath.release(e.mllm, e.unet)
    e.unet.to("cpu")
    e.vae.to("cpu")
    _fresh_peak(b)
    stock_img = stock.full_turn(sm, b.ids, 0, a.steps, 2.0, b.side, b.side)
    stock_gb = torch.cuda.max_memory_allocated(b.device) / 2 ** 30
    del stock_img
    sm.unet.to("cpu")
    sm.vae32.to("cpu")
    e.set_offload("phase")  # everything to the CPU; each stage brings its own modules
    _fresh_peak(b)
    start = time.perf_counter()
    e.generate(PROMPT, seed=0, steps=a.steps, cfg=2.0, width=b.side, height=b.side)
    turn_s = time.perf_counter() - start
    ours_gb = torch.cuda.max_memory_allocated(b.device) / 2 ** 30
    return b.add({"name": FIGURES[7], "stock_s": stock_gb, "ours_s": ours_gb, "ratio": stock_gb / ours_gb,
                  "unit": "GB", "repeats": 1, "phase_turn_s": turn_s,
                  "note": f"torch.cuda.max_memory_allocated over one full turn; stock: LLM + EVA + UNet + fp32 VAE "
                          f"resident; ours: offload='phase' (turn took {turn_s:.1f} s with the moves)"})


def _fresh_peak(b: Bench):
    gc.collect()
    torch.cuda.synchronize(b.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(b.device)


def _run_child(b: Bench, kind: str) -> dict:
    a = b.args
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--size", "tiny", "--device", a.device,
           "--json", os.path.join(a.workdir, f"child-{kind}.json"), "--steps", str(a.steps), "--image-size",
           str(b.side), "--workdir", a.workdir, "--tiny-dir", b.official if kind == "stock" else b.converted]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child ({kind}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_peak(args) -> dict:
    """In a fresh process: RSS growth from just before loading to the end of one full turn."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: F401 - imported
    from transformers import DynamicCache, LlamaForCausalLM  # noqa: F401 - before the baseline, as in a server

    baseline = _rss_kb()
    side = args.image_size
    if args.child == "stock":  # --tiny-dir: the official layout
        parts, mods = stock.load_official(args.tiny_dir, torch.device(args.device), torch.float32)
        sm = stock.from_modules(parts, mods, args.device, torch.float32)
        ids = prompting.prompt_ids(mods["tokenizer"], [prompting.Turn(PROMPT)], parts.mllm_cfg.n_query, "generate",
                                   force_image=True)
        stock.full_turn(sm, ids, 0, args.steps, 2.0, side, side)
    else:  # --tiny-dir: the converted layout
        e = WeGenEngine(loading.load_parts(args.tiny_dir), device=args.device, dtype="auto")
        e.generate(PROMPT, seed=0, steps=args.steps, cfg=2.0, width=side, height=side)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_gb": (peak_kb - baseline) / 2 ** 20, "baseline_gb": baseline / 2 ** 20}


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _features(b: Bench, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 64, C) random image features (the UNet and the history need only their shape)."""
    g = torch.Generator().manual_seed(seed)
    cfg = b.engine.mllm_cfg
    return torch.randn(n, cfg.n_gen_tokens, cfg.feature_dim, generator=g)


FIGURE_FUNCS = (fig_decode, fig_sweep, fig_unet, fig_vae, fig_full_turn, fig_chat, fig_load, fig_peak)
# Run order: the cheap, central figures first; peak memory moves every module (last but one on a GPU).
ORDER = (0, 2, 3, 4, 5, 1, 7, 6)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    previous = fastpath.configure()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.child:
            print(json.dumps(child_peak(args)))
        else:
            run_figures(args)
    finally:  # in-process callers (tests) get their settings back
        torch.set_num_threads(threads)
        fastpath.configure(**dataclasses.asdict(previous))
    return 0


def run_figures(args):
    b = Bench(args)
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
    b.write()
    with open(args.json, encoding="utf-8") as f:
        print(markdown_table(json.load(f)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
