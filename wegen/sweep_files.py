"""A sweep's output folder: sweep.json, its PNGs and features.safetensors; resuming and replaying. EXTENSION.

`sweep.json` (format wegen-sweep/1) records every prompt, seed, setting, batch and the engine, so that
`wegen.sweep.reproduce` can make any image again bit for bit on the same kind of machine. Each finished
decode batch writes its PNGs and then the manifest (atomic writes), and the prompts' features go to
`features.safetensors`: a rerun with `resume=True` (`open_out_dir`) removes the temp files a killed write
left (`.tmp-*`), skips finished batches and redoes unfinished ones whole, so resumed images equal
uninterrupted ones bit for bit. Running the sweep is
wegen/sweep.py; this module only reads and writes the folder.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from .files import remove_temp_files, write_atomic, write_json_atomic
from .inputs import check_features, check_manifest

if TYPE_CHECKING:
    from .sweep import SweepPlan, SweepSettings

log = logging.getLogger(__name__)

FORMAT = "wegen-sweep/1"
MANIFEST = "sweep.json"
FEATURES = "features.safetensors"
SHEET = "contact_sheet.png"
MUST_MATCH = ("format", "settings", "rewrite", "prompts", "seeds", "encode_batches", "decode_batches")
ENGINE_MUST_MATCH = ("checkpoint", "dtype", "vae_dtype", "device", "threads")


def build_manifest(info: dict, settings: SweepSettings, plan: SweepPlan, rewrite: dict | None) -> dict:
    """sweep.json: every prompt, seed, setting and batch needed to make each image again exactly."""
    enc_of = {k: j for j, b in enumerate(plan.encode_batches) for k in b}
    dec_of = {i: j for j, b in enumerate(plan.decode_batches) for i in b}
    items = []
    for i in range(len(plan.prompts) * len(plan.seeds)):
        k, s = plan.item(i)
        items.append({"index": i, "file": f"{i:05d}_p{k:03d}_s{plan.seeds[s]}.png", "prompt_index": k,
                      "seed_index": s, "prompt": plan.prompts[k], "seed": plan.seeds[s],
                      "encode_seed": plan.encode_seed(settings, k), "encode_batch": enc_of[k],
                      "decode_batch": dec_of[i], "done": False})
    return {
        "format": FORMAT,
        "extension": "WeGen diversity sweep (not in the official release)",
        "engine": {k: info[k] for k in ("checkpoint", "dtype", "vae_dtype", "device", "offload", "preset",
                                        "weight_dtype", "threads", "torch")},
        "settings": asdict(settings),
        "rewrite": rewrite,
        "prompts": plan.prompts,
        "seeds": plan.seeds,
        "encode_batches": plan.encode_batches,
        "decode_batches": plan.decode_batches,
        "items": items,
        "status": "running",
        "reproduce": "python -m wegen sweep --replay sweep.json --index I --out FILE.png",
    }


def open_out_dir(out_dir: str, manifest: dict, resume: bool) -> set:
    """Create out_dir / check a resumable sweep.json there. Returns the item indices already done."""
    from .images import check_writable

    check_writable(out_dir, is_dir=True)
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if resume:  # a sweep killed while writing its first sweep.json
            _remove_temp_files(out_dir)
        write_manifest(out_dir, manifest)
        return set()
    if not resume:
        raise ValueError(f"out dir {out_dir} already holds a {MANIFEST}; pass resume (--resume) to continue it, "
                         f"or choose another output folder")
    old = load_manifest(path)
    for key in MUST_MATCH:
        if old.get(key) != manifest[key]:
            raise ValueError(f"cannot resume {path}: its {key} differs from this run's; rerun with the same "
                             f"prompt, seeds and settings, or choose another output folder")
    for key in ENGINE_MUST_MATCH:
        if old["engine"].get(key) != manifest["engine"][key]:
            raise ValueError(f"cannot resume {path}: it was made with engine {key}={old['engine'].get(key)!r}, "
                             f"this run has {manifest['engine'][key]!r} (images would not match bit for bit)")
    _remove_temp_files(out_dir)
    done = {it["index"] for it in old["items"]
            if it.get("done") and os.path.isfile(os.path.join(out_dir, it["file"]))}
    for it in manifest["items"]:
        it["done"] = it["index"] in done
    write_manifest(out_dir, manifest)
    log.info("resuming %s: %d of %d images already done", path, len(done), len(manifest["items"]))
    return done


def _remove_temp_files(out_dir: str):
    removed = remove_temp_files(out_dir)
    if removed:
        log.info("removed %d temp files a killed sweep left in %s: %s", len(removed), out_dir, ", ".join(removed))


def load_manifest(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep manifest not found: {os.path.abspath(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read sweep manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} sweep manifest")
    return check_manifest(manifest, path)


def write_manifest(out_dir: str, manifest: dict):
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)


def write_batch(out_dir: str, manifest: dict, batch: list[int], images):
    from .images import save_png

    for i, image in zip(batch, images):
        it = manifest["items"][i]
        save_png(image, os.path.join(out_dir, it["file"]), {"prompt": it["prompt"], "seed": it["seed"],
                                                            "sweep_index": i,
                                                            "settings": json.dumps(manifest["settings"])})
        it["done"] = True
    write_manifest(out_dir, manifest)


def read_png(out_dir: str, name: str) -> torch.Tensor:
    from .images import load_image

    return load_image(os.path.join(out_dir, name))[0]


def save_features(out_dir: str, features: torch.Tensor):
    from safetensors.torch import save

    write_atomic(os.path.join(out_dir, FEATURES), save({"features": features.contiguous()}))


def load_features(out_dir, plan: SweepPlan):
    from safetensors.torch import load_file

    path = os.path.join(out_dir, FEATURES)
    if not os.path.isfile(path):
        return None
    try:
        features = load_file(path).get("features")
    except Exception as e:  # SafetensorError, OSError: a damaged or edited file
        raise ValueError(f"{path} is damaged or was edited ({str(e).splitlines()[0]}); run the sweep again into "
                         f"a new folder") from e
    return check_features(features, path, len(plan.prompts))


def finish_out_dir(out_dir: str, manifest: dict, sheet: torch.Tensor):
    """Write the contact sheet and mark the sweep done."""
    from .images import save_png

    save_png(sheet, os.path.join(out_dir, SHEET))
    manifest["contact_sheet"] = SHEET
    manifest["status"] = "done"
    write_manifest(out_dir, manifest)
