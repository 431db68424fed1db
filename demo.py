"""The demo, the README's main command: `python demo.py [--checkpoint DIR|NAME] [--tiny] [--out DIR]`.

Runs every workflow in workflows/ headless through the node classes on the bundled wegen-toy checkpoint and writes
PNGs + index.html (each picture judged by the shapes world's reader) to output/demo/. The pack is loaded the way
ComfyUI loads a custom node folder: this folder's __init__.py as a package (named after the pack's folder,
ComfyUI-WeGen), so the nodes reach the engine through their relative imports, exactly as inside ComfyUI.
ComfyUI itself never imports this file (it imports the folder's __init__.py only).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
PACK_NAME = "ComfyUI_WeGen"
DEFAULT_TINY = os.path.join("models", "wegen", "tiny")


def load_pack(name: str = PACK_NAME):
    """This folder as ComfyUI imports it: __init__.py as package `name`, registered in sys.modules."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    try:
        spec.loader.exec_module(pack)
    except BaseException:
        del sys.modules[name]
        raise
    return pack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or bundled name (default: wegen-toy; with --tiny: models/wegen/tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="build the tiny random-weight checkpoint at --checkpoint when missing (noise pictures)")
    parser.add_argument("--out", default=os.path.join("output", "demo"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    load_pack()
    from ComfyUI_WeGen.nodes.demo import DEFAULT_CHECKPOINT, run_demo

    checkpoint = args.checkpoint or (DEFAULT_TINY if args.tiny else DEFAULT_CHECKPOINT)
    try:
        print(run_demo(checkpoint, args.out, make_tiny=args.tiny))
    except (ValueError, FileNotFoundError) as e:  # a CheckpointError is a ValueError
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
