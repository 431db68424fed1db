"""`python -m wegen ...`: the engine from a command line.

Exit code 0 on success, 2 with a one-line `error: ...` message on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_TINY = os.path.join("models", "wegen", "tiny")


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


def _add_decode_args(p):
    p.add_argument("--seed", type=int, default=42, help="official: 42")
    p.add_argument("--steps", type=int, default=50, help="Euler steps, 1..1000 (official: 50)")
    p.add_argument("--cfg", type=float, default=2.0, help="UNet guidance (official: 2 for FID, 7 for CLIP-T)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the UNet's)")


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

    p = sub.add_parser("generate", help="prompt (+ reference images) -> PNG")
    _add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="reference image (repeatable)")
    _add_decode_args(p)
    p.add_argument("--var-cfg", type=float, default=1.0, help="var-cfg scale (official: 1 = off)")
    p.add_argument("--feature-slice", default="official", choices=["official", "aligned"])
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

    p = sub.add_parser("demo", help="tiny checkpoint (built if missing) -> output/demo/ with index.html")
    p.add_argument("--checkpoint", default=DEFAULT_TINY)
    p.add_argument("--out", default=os.path.join("output", "demo"))
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .loading import CheckpointError

    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _engine(args):
    import torch

    from .engine import WeGenEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return WeGenEngine.load(args.checkpoint, dtype=args.dtype, device=device)


def _wh(args, engine):
    if args.size is None:
        return engine.decoder_cfg.default_size, engine.decoder_cfg.default_size
    return args.size


def cmd_make_tiny(args):
    from .tiny import make_tiny

    print(make_tiny(args.dir, seed=args.seed))


def cmd_convert(args):
    from .loading import convert

    print(convert(args.src, args.dst))


def cmd_generate(args):
    from .decoder import check_decode_args, check_size
    from .images import check_writable, load_image, save_png

    check_writable(args.out)
    check_decode_args(args.steps, args.cfg, 1.0)
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

    if not paths:
        return None
    images = [load_image(p) for p in paths]
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
    from .decoder import check_decode_args, check_size
    from .images import check_writable, load_image, save_png

    check_writable(args.out)
    check_decode_args(args.steps, args.cfg, 1.0)
    if args.size:
        check_size(*args.size)
    image = load_image(args.image)
    engine = _engine(args)
    width, height = _wh(args, engine)
    out = engine.reconstruct(image, seed=args.seed, steps=args.steps, cfg=args.cfg, width=width, height=height)
    save_png(out[0], args.out)
    print(json.dumps({"out": args.out}))


def cmd_demo(args):
    from .demo import run_demo

    print(run_demo(args.checkpoint, args.out))


COMMANDS = {"make-tiny": cmd_make_tiny, "convert": cmd_convert, "generate": cmd_generate,
            "understand": cmd_understand, "reconstruct": cmd_reconstruct, "demo": cmd_demo}
