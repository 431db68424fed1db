"""`python -m wegen ...`: the engine from a command line.

Exit code 0 on success, 2 with a one-line `error: ...` message on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import cli_toy, inputs, rules

DEFAULT_SESSIONS = os.path.join("output", "wegen", "sessions")  # ComfyUI keeps them in <output>/wegen/sessions


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _size(text: str) -> tuple[int, int]:
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            return int(w), int(h)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT or one number, got {text!r}") from None


def _add_engine_args(p, checkpoint_required=True):
    p.add_argument("--checkpoint", required=checkpoint_required,
                   help="wegen_mllm_ckpt/ folder, its parent, or a converted folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    for flag, choices, tip in (("--preset", rules.PRESETS, "release: the release's numerics (see the README)"),
                               ("--offload", rules.OFFLOAD_MODES, "GPU memory mode (README: GPU memory)"),
                               ("--weight-dtype", rules.WEIGHT_DTYPES, "fp8: weights stored in fp8 (extension)")):
        p.add_argument(flag, default=choices[0], choices=choices, help=tip)


def _add_decode_args(p):
    p.add_argument("--seed", type=int, default=42, help="official: 42")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Euler steps, 1..{rules.MAX_STEPS} (default: the checkpoint's recommendation, else the "
                        f"release's 50)")
    p.add_argument("--cfg", type=float, default=None,
                   help="UNet guidance (default: the checkpoint's recommendation, else 2.0; the release uses 2 for "
                        "FID, 7 for CLIP-T)")
    p.add_argument("--size", type=_size, default=None,
                   help=f"WIDTHxHEIGHT, multiples of {rules.SIZE_MULTIPLE} up to {rules.MAX_SIDE} (default: the "
                        f"checkpoint's recommendation, else the UNet's)")


def _add_feature_slice_arg(p):
    p.add_argument("--feature-slice", default=None, choices=list(rules.FEATURE_SLICES),
                   help="default: the checkpoint's recommendation, else the release's 'official'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m wegen", description="WeGen engine command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and why")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint (official layout)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("convert", help="official layout -> converted layout (safetensors, mmap)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--weight-dtype", default="default", choices=rules.WEIGHT_DTYPES,
                   help="fp8: LLM/EVA/UNet Linear and Conv weights stored in fp8 (src may then be converted)")

    p = sub.add_parser("generate", help="prompt (+ reference images) -> PNG")
    _add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="reference image (repeatable)")
    _add_decode_args(p)
    p.add_argument("--var-cfg", type=float, default=1.0, help="var-cfg scale (official: 1 = off)")
    _add_feature_slice_arg(p)
    p.add_argument("--no-force-image", action="store_true", help="let the model decide to emit <img> (official)")
    p.add_argument("--out", required=True, help="output PNG path")

    p = sub.add_parser("understand", help="image(s) + question -> text")
    _add_engine_args(p)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("reconstruct", help="image -> EVA -> UNet -> PNG")
    _add_engine_args(p)
    p.add_argument("--image", required=True)
    _add_decode_args(p)
    p.add_argument("--out", required=True)

    p = sub.add_parser("chat", help="one turn of a chat session kept on disk (resumes across invocations)")
    _add_engine_args(p)
    p.add_argument("--session", required=True, help="session name: a folder inside --sessions-dir")
    p.add_argument("--sessions-dir", default=DEFAULT_SESSIONS, help=f"default: {DEFAULT_SESSIONS}")
    p.add_argument("--image", action="append", default=[], help="input image for this turn (repeatable)")
    p.add_argument("message")
    _add_decode_args(p)
    p.add_argument("--strength", type=float, default=1.0,
                   help="decoder start from the previous image: 1 = pure noise (official), lower keeps more")
    p.add_argument("--mask", default=None, help="edit mask image (white = edit); outside it the previous image stays")
    p.add_argument("--feather", type=int, default=16, help=f"mask edge blend in pixels, 0..{rules.MAX_FEATHER}")
    p.add_argument("--reference", default="auto", choices=["auto", "previous", "none"],
                   help="decoder reference: auto = the previous image when --strength < 1 or --mask")
    p.add_argument("--history-features", default="stored", choices=list(rules.HISTORY_FEATURES),
                   help="past images re-enter from their stored 64 features, or re-encoded with EVA")
    _add_feature_slice_arg(p)
    p.add_argument("--reset", action="store_true",
                   help="drop the session's earlier turns; committed with this turn (a failed turn keeps them)")
    p.add_argument("--transcript", default=None, help="also write an HTML transcript of the session here")
    p.add_argument("--out", required=True, help="output PNG path")

    _add_psr_parsers(sub)

    cli_toy.add_parsers(sub, _add_engine_args)

    p = sub.add_parser("demo", help="moved: run `python demo.py` in the pack's folder (it runs the node graph, which "
                                    "the engine does not import)")
    p.add_argument("--checkpoint")  # the demo's options, accepted so that the pointer is what a user sees
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        inputs.precheck(args)  # device, texts, output paths and session folders: before any model loads
        if getattr(args, "seed", None) is not None:
            rules.check_seed(args.seed, "--seed")  # before any model is loaded
        if args.command in RECOMMENDED_FOR:
            _apply_recommended(args)
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError) as e:  # loading.CheckpointError is a ValueError
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder, a folder where a file belongs ...
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


RECOMMENDED_FOR = ("generate", "reconstruct", "chat", "sweep")


def _apply_recommended(args):
    """Decode settings left unset -> the checkpoint's recommendation (an extension; the release's values otherwise)."""
    from .loading import RELEASE_SETTINGS, recommended_settings

    values = recommended_settings(args.checkpoint) if args.checkpoint else dict(RELEASE_SETTINGS)
    for key in ("steps", "cfg", "feature_slice"):
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, values[key])
    if args.size is None and "width" in values and "height" in values:
        args.size = (values["width"], values["height"])


def _engine(args):
    import torch

    from .engine import WeGenEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return WeGenEngine.load(args.checkpoint, dtype=args.dtype, device=device, offload=args.offload,
                            preset=args.preset, weight_dtype=args.weight_dtype)


def _wh(args, engine):
    if args.size is None:
        return engine.decoder_cfg.default_size, engine.decoder_cfg.default_size
    return args.size


def cmd_make_tiny(args):
    from .tiny import make_tiny

    print(make_tiny(args.dir, seed=args.seed))


def cmd_convert(args):
    from .loading import convert

    print(convert(args.src, args.dst, weight_dtype=args.weight_dtype))


def cmd_generate(args):
    from .images import check_image_out, load_image, save_png
    from .rules import check_decode_args, check_finite, check_size

    check_image_out(args.out)
    check_decode_args(args.steps, args.cfg, 1.0)
    check_finite(args.var_cfg, "--var-cfg")
    if args.size:
        check_size(*args.size)
    refs = _load_images(args.image, load_image)
    engine = _engine(args)
    width, height = _wh(args, engine)
    images, cond = engine.generate(args.prompt, refs, seed=args.seed, steps=args.steps, cfg=args.cfg, width=width,
                                   height=height, var_cfg_scale=args.var_cfg, feature_slice=args.feature_slice,
                                   force_image=not args.no_force_image)
    save_png(images[0], args.out, {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "cfg": args.cfg,
                                   "reply": cond.texts[0]})
    print(json.dumps({"out": args.out, "reply": cond.texts[0]}))


def _load_images(paths, load_image):
    import torch

    from .rules import check_finite

    if not paths:
        return None
    images = [check_finite(load_image(p), f"--image {p}") for p in paths]
    size = images[0].shape[1:3]
    # EVA resizes every image to 448 px; bring all to the first one's size so they stack
    return torch.cat([im if im.shape[1:3] == size else
                      torch.nn.functional.interpolate(im.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                                                      align_corners=False).permute(0, 2, 3, 1) for im in images])


def cmd_understand(args):
    from .images import load_image

    images = _load_images(args.image, load_image)
    engine = _engine(args)
    print(engine.understand(images, args.question, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed))


def cmd_reconstruct(args):
    from .images import check_image_out, load_image, save_png
    from .rules import check_decode_args, check_size

    check_image_out(args.out)
    check_decode_args(args.steps, args.cfg, 1.0)
    if args.size:
        check_size(*args.size)
    image = _load_images([args.image], load_image)
    engine = _engine(args)
    width, height = _wh(args, engine)
    out = engine.reconstruct(image, seed=args.seed, steps=args.steps, cfg=args.cfg, width=width, height=height)
    save_png(out[0], args.out)
    print(json.dumps({"out": args.out}))


def cmd_chat(args):
    from . import chat, sessions
    from .images import check_image_out, check_writable, load_image, save_png
    from .rules import check_decode_args, check_finite, check_size

    sessions.check_session_name(args.session)
    check_image_out(args.out)
    if args.transcript:
        check_writable(args.transcript)
    check_decode_args(args.steps, args.cfg, args.strength)
    if args.size:
        check_size(*args.size)
    images = _load_images(args.image, load_image)
    mask = check_finite(load_image(args.mask), f"--mask {args.mask}")[0].mean(-1) if args.mask else None  # (H, W)
    engine = _engine(args)
    width, height = args.size or (None, None)
    result = chat.chat_turn(engine, args.sessions_dir, args.session, args.message, images, seed=args.seed,
                            steps=args.steps, cfg=args.cfg, width=width, height=height,
                            reference=None if args.reference == "none" else args.reference, mask=mask,
                            strength=args.strength, feather=args.feather, history_features=args.history_features,
                            feature_slice=args.feature_slice, reset=args.reset)
    save_png(result.image[0], args.out, {"message": args.message, "seed": args.seed, "reply": result.reply})
    if args.transcript:
        sessions.write_transcript(result.session, args.transcript)
    print(json.dumps({"out": args.out, "reply": result.reply, "session": args.session,
                      "turn": len(result.session.turns), **result.record.stats}))


def cmd_demo(args):
    from .demo import DEMO_COMMAND

    print(f"error: the demo runs the node graph, which the engine does not import; run `{DEMO_COMMAND} "
          f"[--checkpoint DIR|NAME] [--tiny] [--out DIR]` in the pack's folder instead", file=sys.stderr)
    return 2


# Prompt Self-Rewriting, diversity sweeps, remote queue (extensions) ---------------------------------

def _add_psr_parsers(sub):
    p = sub.add_parser("rewrite", help="prompt -> K self-rewrites by the MLLM, one JSON line each (extension)")
    _add_engine_args(p)
    p.add_argument("--prompt", required=True)
    _add_rewrite_args(p, n_required=True)
    p.add_argument("--seed", type=int, default=42, help="rewrite i samples with seed + i")

    p = sub.add_parser("sweep", help="prompt -> K self-rewrites x seeds -> PNGs, contact sheet, sweep.json "
                                     "(extension)")
    _add_engine_args(p, checkpoint_required=False)
    p.add_argument("--prompt")
    _add_rewrite_args(p, n_required=False)
    p.add_argument("--seeds", default="4", help="a count N (image seeds SEED .. SEED+N-1) or a comma list of "
                                                "seeds (7,42,1000; '42,' = one seed); default 4")
    _add_decode_args(p)
    _add_feature_slice_arg(p)
    p.add_argument("--memory-budget", type=int, default=4096, help="MiB that bound the batch sizes (default 4096)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch whatever the budget")
    p.add_argument("--out", help="output folder (a PNG path with --replay)")
    p.add_argument("--resume", action="store_true", help="continue the sweep.json in --out, skipping finished batches")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS: auto, HOST:6379, ray://HOST:10001) or, without ADDRESS, "
                        "a local Ray instance; needs the optional ray package")
    p.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per GPU, else 1)")
    p.add_argument("--replay", metavar="SWEEP_JSON", help="make image --index of that sweep again (to --out FILE.png)")
    p.add_argument("--index", type=int, default=0, help="item of the sweep for --replay")

    p = sub.add_parser("queue", help="batch-queue a workflow on running ComfyUI servers, round-robin (extension)")
    p.add_argument("workflow", help="workflow JSON, UI or API format")
    p.add_argument("--server", action="append", required=True, help="ComfyUI URL (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="NODE.INPUT=v1,v2,...",
                   help="values to sweep (NODE: id or title); several --set give their cartesian product")
    p.add_argument("--out", default=os.path.join("output", "queue"), help="downloads + queue_state.json")
    p.add_argument("--max-pending", type=int, default=2, help="jobs queued on each server at a time")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one job")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between history checks")


def _add_rewrite_args(p, n_required: bool):
    from . import rewrite

    p.add_argument("-n", type=int, required=n_required, default=None, help="K, how many prompts")
    p.add_argument("--temperature", type=float, default=rewrite.DEFAULT_TEMPERATURE,
                   help="rewrite sampling temperature (> 0 for K > 1)")
    p.add_argument("--top-p", type=float, default=rewrite.DEFAULT_TOP_P)
    p.add_argument("--max-new-tokens", type=int, default=rewrite.DEFAULT_MAX_NEW_TOKENS,
                   help="token cap of one rewrite")
    p.add_argument("--max-chars", type=int, default=rewrite.DEFAULT_MAX_CHARS, help="character cap of one rewrite")
    p.add_argument("--keep-original", action="store_true", help="the prompt itself is the first of the K")
    p.add_argument("--template", default=None, help="rewrite instruction with {prompt} (or @FILE); default: "
                                                     "wegen.rewrite.DEFAULT_TEMPLATE")
    p.add_argument("--max-rounds", type=int, default=rewrite.DEFAULT_MAX_ROUNDS,
                   help="batched decodes allowed, re-sampling included")


def _rewrite_kwargs(args) -> dict:
    """Checked rewrite settings (before any model is loaded)."""
    from .rewrite import DEFAULT_TEMPLATE, check_rewrite_inputs

    template = args.template or DEFAULT_TEMPLATE
    if template.startswith("@"):
        try:
            with open(template[1:], encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--template {template}: cannot read the file as UTF-8 text "
                             f"({getattr(e, 'strerror', None) or e})") from None
    kw = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
              max_chars=args.max_chars, keep_original=args.keep_original, template=template,
              max_rounds=args.max_rounds)
    check_rewrite_inputs(args.prompt, args.n, args.seed, args.temperature, args.top_p, args.max_new_tokens,
                         args.max_chars, template, args.max_rounds, args.keep_original)
    return kw


def cmd_rewrite(args):
    from .rewrite import rewrite_prompt

    kw = _rewrite_kwargs(args)
    result = rewrite_prompt(_engine(args), args.prompt, args.n, seed=args.seed, **kw)
    for record in result.records():
        print(json.dumps(record, ensure_ascii=False))


def cmd_sweep(args):
    from . import sweep as sw
    from .images import check_writable

    if args.replay:
        return _replay(args)
    if not args.checkpoint or not args.prompt or args.n is None or not args.out:
        raise ValueError("sweep needs --checkpoint DIR, --prompt TEXT, -n K and --out DIR (or --replay SWEEP_JSON)")
    kw = _rewrite_kwargs(args)
    seeds = sw.parse_seeds(args.seeds, args.seed)
    width, height = args.size or (None, None)
    settings = sw.SweepSettings(steps=args.steps, cfg=args.cfg, width=width, height=height,
                                feature_slice=args.feature_slice, memory_budget_mb=args.memory_budget,
                                max_batch=args.max_batch)
    sw.check_sweep_inputs(["-"] * args.n, seeds, settings)
    if os.path.exists(os.path.join(args.out, sw.MANIFEST)) and not args.resume:
        raise ValueError(f"{args.out} already holds a {sw.MANIFEST}; add --resume to continue it, or use another --out")
    check_writable(args.out, is_dir=True)  # a read-only or full disk: found before the model loads
    executor = _sweep_executor(args)
    try:
        prompts, rewrite = _sweep_prompts(args, executor, kw)
        result = sw.run_sweep(executor, prompts, seeds, settings, out_dir=args.out, resume=args.resume,
                              rewrite=rewrite)
    finally:
        if hasattr(executor, "close"):
            executor.close()
    print(json.dumps({"out": args.out, "manifest": os.path.join(args.out, sw.MANIFEST),
                      "contact_sheet": os.path.join(args.out, sw.SHEET), "images": len(result.prompts),
                      "prompts": len(prompts), "seeds": seeds, "diversity": result.diversity}, ensure_ascii=False))


def _sweep_executor(args):
    if args.ray is None:
        from .sweep import LocalExecutor

        return LocalExecutor(_engine(args))
    try:
        from .ray_sweep import RayExecutor

        return RayExecutor(args.checkpoint, args.ray or None, dtype=args.dtype, device=args.device,
                           workers=args.ray_workers, offload=args.offload, preset=args.preset,
                           weight_dtype=args.weight_dtype)
    except ImportError as e:
        raise ValueError(str(e)) from e


def _sweep_prompts(args, executor, kw):
    """The K prompts: reused from sweep.json when resuming the same rewrite, else rewritten now."""
    from .sweep import MANIFEST, load_manifest

    path = os.path.join(args.out, MANIFEST)
    if args.resume and os.path.isfile(path):
        old = load_manifest(path).get("rewrite") or {}
        same = {k: old.get(k) for k in ("source", "n", "seed", *kw)}
        if same == {"source": " ".join(args.prompt.split()), "n": args.n, "seed": args.seed, **kw}:
            return load_manifest(path)["prompts"], old
    result = executor.rewrite(args.prompt, args.n, seed=args.seed, **kw)
    return result.prompts, {"source": result.source, **result.settings, "seeds": result.seeds,
                            "rounds": result.rounds}


def _replay(args):
    import torch

    from .engine import WeGenEngine
    from .images import check_image_out, save_png
    from .sweep import load_manifest, reproduce

    manifest = load_manifest(args.replay)
    if not args.out:
        raise ValueError("--replay needs --out FILE.png")
    check_image_out(args.out)
    eng = manifest["engine"]
    device = inputs.check_device(args.device or eng["device"])
    if device.startswith("cpu") and eng.get("threads"):
        torch.set_num_threads(int(eng["threads"]))  # CPU float reductions depend on the thread count
    engine = WeGenEngine.load(args.checkpoint or eng["checkpoint"],
                              dtype=eng["dtype"] if args.dtype == "auto" else args.dtype, device=device,
                              preset=eng.get("preset", args.preset), weight_dtype=eng.get("weight_dtype", "default"))
    image = reproduce(engine, manifest, args.index)
    item = manifest["items"][args.index]
    save_png(image[0], args.out, {"prompt": item["prompt"], "seed": item["seed"], "sweep_index": args.index})
    print(json.dumps({"out": args.out, "index": args.index, "prompt": item["prompt"], "seed": item["seed"]},
                     ensure_ascii=False))


def cmd_queue(args):
    from .queueing import run_queue

    summary = run_queue(args.workflow, args.server, args.sets, args.out, max_pending=args.max_pending,
                        timeout=args.timeout, poll=args.poll, report=_print_job)
    print(json.dumps({"summary": True, **{k: v for k, v in summary.items() if k != "errors"}}))
    if summary["failed"]:
        print(f"error: {summary['failed']} of {summary['jobs']} jobs failed: {summary['errors'][0]}", file=sys.stderr)
        return 1


def _print_job(record):
    keys = ("index", "status", "server", "prompt_id", "overrides", "files", "error", "skipped")
    print(json.dumps({k: record[k] for k in keys if record.get(k) is not None}, ensure_ascii=False), flush=True)


COMMANDS = {"make-tiny": cmd_make_tiny, "convert": cmd_convert, "generate": cmd_generate,
            "understand": cmd_understand, "reconstruct": cmd_reconstruct, "chat": cmd_chat, "demo": cmd_demo,
            **cli_toy.COMMANDS}
COMMANDS.update({"rewrite": cmd_rewrite, "sweep": cmd_sweep, "queue": cmd_queue})
