"""The shapes-world commands of `python -m wegen`: `diic`, `train-toy`, `eval-toy` (see wegen/cli.py)."""
from __future__ import annotations

import json
import sys

from .train.run import STAGES


def add_parsers(sub, add_engine_args):
    """The three sub-commands' parsers; `add_engine_args` is the CLI's --checkpoint/--dtype/--device helper."""
    p = sub.add_parser("diic", help="mine single-change edit sequences from shapes-world clips (DIIC stand-in)")
    p.add_argument("clips", metavar="CLIPS_OR_COUNT", help="how many clips to generate, or a folder whose "
                                                            "subfolders each hold one clip's frames as PNG files")
    p.add_argument("out", metavar="OUT", help="output folder: sequences.jsonl, summary.json, PNGs")
    p.add_argument("--seed", type=int, default=0, help="generated clips: clip i is drawn from (seed, i)")

    p = sub.add_parser("train-toy", help="train the toy WeGen on the shapes world (resumable) -> OUT/wegen-toy")
    p.add_argument("out", help="working folder (stage checkpoints, bank, DIIC data, train.log)")
    p.add_argument("--stage", action="append", default=None,
                   help=f"run only this stage (repeatable): {', '.join(STAGES)}, or all (default)")
    p.add_argument("--steps", action="append", default=[], metavar="STAGE=N",
                   help="steps of one stage (repeatable), e.g. --steps stage1=3000")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (stage1 and stage2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")

    p = sub.add_parser("eval-toy", help="measure a checkpoint on the shapes world: table + one JSON line "
                                        "(wegen.toyeval)")
    add_engine_args(p, checkpoint_required=False)
    p.set_defaults(checkpoint="wegen-toy")
    p.add_argument("--n", type=int, default=50, help="items per figure (rewrites: N/2 prompts x 6)")
    p.add_argument("--seed", type=int, default=0, help="every item's scene and seed are drawn from it")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result here (atomically)")
    p.add_argument("--floors", action="store_true",
                   help="exit 1 when a figure is below its floor in wegen.toyeval.FLOORS")


def cmd_diic(args):
    from .diic import run

    try:
        source = int(args.clips)
    except ValueError:
        source = args.clips
    if isinstance(source, int) and not 1 <= source <= 1_000_000:
        raise ValueError(f"CLIPS_OR_COUNT must be a clip count in 1..1000000 or a folder of clip folders, "
                         f"got {args.clips}")
    try:
        summary = run(source, args.out, seed=args.seed)
    except OSError as e:
        raise ValueError(f"{args.out}: cannot be written ({e.strerror or e})") from e
    print(json.dumps(summary))


def cmd_train_toy(args):
    from .train.run import train_toy

    stages = STAGES if not args.stage or "all" in args.stage else tuple(args.stage)
    steps = {}
    for item in args.steps:
        stage, _, n = item.partition("=")
        try:
            steps[stage] = int(n)
        except ValueError:
            raise ValueError(f"--steps takes STAGE=N, got {item!r}") from None
    print(train_toy(args.out, stages, steps, device=args.device, seed=args.seed, threads=args.threads))


def cmd_eval_toy(args):
    from . import toyeval

    toyeval.check_inputs(args.n, args.seed, args.json, args.checkpoint, args.device)
    from .cli import _engine

    engine = _engine(args)
    result = toyeval.run_eval(engine, args.n, args.seed, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(toyeval.format_table(result))
    print(json.dumps(result))
    if args.json:
        toyeval.write_json(args.json, result)
    below = toyeval.check_floors(result, toyeval.FLOORS) if args.floors else []
    if below:
        print(f"error: {len(below)} figure(s) below floor: {'; '.join(below)}", file=sys.stderr)
        return 1


COMMANDS = {"diic": cmd_diic, "train-toy": cmd_train_toy, "eval-toy": cmd_eval_toy}
