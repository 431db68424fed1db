"""Checks of what a user or a file on disk hands in, made before any model loads: one ValueError line each.

The CLI runs `precheck(args)` before a command: the device exists, every text argument is valid UTF-8
(no lone surrogates from undecodable argv bytes) and holds no chat-template turn marker, and every output
path and session folder can be written (a probe write: a read-only or full disk is found now, not after
the model ran). `check_manifest` / `check_features` validate a sweep's sweep.json and
features.safetensors before --resume or --replay trusts them.
"""
from __future__ import annotations

import os
import re

TEXT_ARGS = {"prompt": "--prompt", "message": "the message", "question": "the question"}


def check_device(device) -> str | None:
    """--device: cpu, cuda, cuda:N (present on this machine) or mps (when available)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: only cpu, cuda, cuda:N and mps are supported")
    return device


def check_session_paths(root: str, name: str):
    """The sessions folder can be written; the session's folder and session.json are a folder and a file."""
    from .images import check_writable

    check_writable(root, is_dir=True)
    folder = os.path.join(root, name)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"chat session {name}: {os.path.abspath(folder)} is a file where the session folder belongs")
    session_file = os.path.join(folder, "session.json")
    if os.path.isdir(session_file):
        raise ValueError(f"chat session {name}: {os.path.abspath(session_file)} is a folder where the session file "
                         f"belongs; move it away")
    if os.path.isdir(folder):
        check_writable(folder, is_dir=True)


def precheck(args):
    """Everything about a CLI command's arguments that can be checked before the model loads."""
    from .images import check_image_out, check_writable
    from .prompting import check_user_text

    check_device(getattr(args, "device", None))
    for key, name in TEXT_ARGS.items():
        if isinstance(getattr(args, key, None), str):
            check_user_text(getattr(args, key), name)
    command = args.command
    if command == "chat":
        check_session_paths(args.sessions_dir, args.session)
    out = getattr(args, "out", None)
    if out and (command in ("generate", "reconstruct", "chat") or (command == "sweep" and args.replay)):
        check_image_out(out)
    if getattr(args, "transcript", None):
        check_writable(args.transcript)


# A sweep's files, before --resume / --replay trust them ------------------------------------------------

_ITEM_FILE = re.compile(r"^[0-9]{5}_p[0-9]{3,}_s[0-9]+\.png$")


def _bad(path: str, what: str):
    return ValueError(f"{path} is damaged or was edited: {what}; run the sweep again into a new folder")


def _int_list(value, hi: int | None = None) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (hi is None or v < hi) for v in value)


def check_manifest(manifest: dict, path: str) -> dict:
    """sweep.json's structure: every field --resume and --replay read, with the types and ranges they need."""
    for key in ("engine", "settings"):
        if not isinstance(manifest.get(key), dict):
            raise _bad(path, f"'{key}' must be an object")
    engine = manifest["engine"]
    for key in ("checkpoint", "dtype", "device"):
        if not isinstance(engine.get(key), str):
            raise _bad(path, f"engine.{key} must be a string")
    if engine.get("threads") is not None and not _int_list([engine["threads"]]):
        raise _bad(path, "engine.threads must be an integer")
    prompts, seeds = manifest.get("prompts"), manifest.get("seeds")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad(path, "'prompts' must be a non-empty list of strings")
    if not _int_list(seeds) or not seeds:
        raise _bad(path, "'seeds' must be a non-empty list of integers >= 0")
    for key in ("encode_batches", "decode_batches"):
        batches = manifest.get(key)
        if not isinstance(batches, list) or not all(_int_list(b) and b for b in batches):
            raise _bad(path, f"'{key}' must be a list of non-empty lists of indices")
    items = manifest.get("items")
    if not isinstance(items, list) or len(items) != len(prompts) * len(seeds):
        raise _bad(path, f"'items' must list {len(prompts) * len(seeds)} images (prompts x seeds)")
    n_dec = len(manifest["decode_batches"])
    for i, it in enumerate(items):
        ok = isinstance(it, dict) and it.get("index") == i and isinstance(it.get("file"), str) and \
            _ITEM_FILE.match(it["file"]) and _int_list([it.get("prompt_index")], len(prompts)) and \
            _int_list([it.get("seed")]) and _int_list([it.get("decode_batch")], n_dec) and \
            i in manifest["decode_batches"][it["decode_batch"]] and isinstance(it.get("prompt"), str)
        if not ok:
            raise _bad(path, f"item {i} is malformed (index, file, prompt_index, seed, decode_batch)")
    if not all(k < len(prompts) for b in manifest["encode_batches"] for k in b):
        raise _bad(path, "'encode_batches' names a prompt that is not in 'prompts'")
    from .sweep import check_sweep_inputs, settings_from_manifest

    try:
        check_sweep_inputs(prompts, seeds, settings_from_manifest(manifest))
    except (ValueError, TypeError) as e:
        raise _bad(path, f"settings: {e}") from None
    return manifest


def check_features(features, path: str, n_prompts: int):
    """features.safetensors: a finite float tensor (K, tokens, width) for the K prompts."""
    import torch

    if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[0] != n_prompts or \
            not features.is_floating_point() or min(features.shape) < 1:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise _bad(path, f"'features' must be a float tensor ({n_prompts}, tokens, width), got {shape}")
    if not bool(torch.isfinite(features).all()):
        raise _bad(path, "'features' holds NaN or infinite values")
    return features
