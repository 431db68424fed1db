"""Chat memory (an extension): one chat turn over a session's history, and prefix KV reuse.

The release keeps no history (architecture reference 3.3). Here a session is an ordered list of
turns; turn N's prompt is SEED-X's multi-turn template (prompting.conversation_text) over every
earlier turn, each rendered exactly as the model saw it when it was the current turn (so the
token ids of the history never change). Past generated images re-enter as image blocks whose 64
slot embeddings are in_proj(stored features) (reference 3.3, option ii; the default) or
in_proj(EVA(stored PNG)) (option i, history_features="eva"). Input images keep their EVA features.

The KV cache of each prompt's prefill stays in the engine's byte-bounded LRU (engine.prefix_cache, see
prefix_cache.py); the next turn reuses the longest stored prefix, so it prefills only its new tokens and
re-encodes no past image.

Sessions on disk (folders, the lock, atomic commits) are in sessions.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from . import mllm, prompting, rules
from .engine import check_images
from .prefix_cache import PrefixCache, block_digests
from .sessions import ChatSession, SessionError, TurnRecord, commit_turn, open_session, session_lock, turn_files

HISTORY_FEATURES = rules.HISTORY_FEATURES  # how past generated images re-enter the prompt
REFERENCES = ("previous", "auto")  # named decoder references (besides None and an image tensor)


# One chat turn ------------------------------------------------------------------------------------

@dataclass
class ChatResult:
    image: torch.Tensor  # (1, H, W, 3) float32 0..1, CPU (before PNG quantisation)
    reply: str
    features: torch.Tensor  # (1, 64, C) float32
    session: ChatSession  # the snapshot after the commit
    record: TurnRecord


def chat_turn(engine, root: str, name: str, message: str, images: torch.Tensor | None = None, *, seed: int = 0,
              steps: int = 50, cfg: float = 2.0, width: int | None = None, height: int | None = None,
              reference="auto", mask: torch.Tensor | None = None, strength: float = 1.0, feather: int = 16,
              temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 512, var_cfg_scale: float = 1.0,
              feature_slice: str = "official", force_image: bool = True, history_features: str = "stored",
              expect_turns=None, prefix_cache="auto", callback=None, stage=None, reset: bool = False,
              undo: bool = False) -> ChatResult:
    """Run one turn of session `name` under its lock and append it; on any failure nothing on disk changes.

    Args:
        message: the user's text; images: (N, H, W, 3) input images (image blocks before the text).
        reference: the decoder's reference (an extension; the release's path is references reaching
            the model only as image blocks): None, "previous" (the session's last generated image),
            a (1, H, W, 3) tensor, or "auto" (the previous image, else the first input image, when
            strength < 1 or a mask asks for one; else None). It starts the latents at `strength`
            (1 = pure noise) and, with `mask` ((H, W) or (1, H, W), 1 = edit), keeps everything
            outside mask + feather bit-identical.
        width, height: default to the previous image's size (else the checkpoint's default).
        history_features: "stored" (past generated images re-enter from their 64 features) or
            "eva" (re-encoded from their PNG with EVA, the reference's option i).
        expect_turns: turn ids the session must hold (a ComfyUI graph's pinned state), else SessionError.
        prefix_cache: "auto" (engine.prefix_cache, the engine's own LRU), None (full recompute) or a PrefixCache.
        callback: the engine's per-step callback (raising in it stops the turn; nothing is saved).
        stage: optional `stage(*module_names)` -> context manager yielding the callback for that stage
            ("mllm"/"eva", then "unet"/"vae"): how ComfyUI puts each stage's modules on the GPU.
        reset: drop the session's earlier turns; the turn runs without them and the reset commits with the
            turn, in one step (a turn that fails leaves the old turns in place).
        undo: drop the session's last turn the same way (the turn replaces it; a turn that fails keeps it).
        Other arguments: see WeGenEngine.encode / WeGenEngine.decode_pixels.
    """
    # 1) check inputs (before touching the session)
    if reset and undo:
        raise ValueError("reset and undo cannot both be set: a reset already drops every turn")
    rules.check_decode_args(steps, cfg, strength)
    _check_turn_args(message, images, mask, reference, strength, feather, history_features, seed)
    mask = None if mask is None else mask.reshape(1, *mask.shape[-2:]).float()  # (1, H, W)
    cache = engine.prefix_cache if prefix_cache == "auto" else prefix_cache
    if cache is not None and not isinstance(cache, PrefixCache):
        raise ValueError(f"prefix_cache must be 'auto', None or a PrefixCache, got {prefix_cache!r}")
    settings = mllm.DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   var_cfg_scale=var_cfg_scale, feature_slice=feature_slice)
    rules.check_sampling(temperature, top_p, max_new_tokens)

    with session_lock(root, name):
        # 2) the session as it is now (as the turn sees it: without its turns when resetting, without the last
        # one when undoing)
        on_disk = open_session(root, name)
        if expect_turns is not None and tuple(expect_turns) != on_disk.turn_ids:
            raise SessionError(f"chat session {name!r} changed since this chat state was made (it holds turns "
                               f"{list(on_disk.turn_ids)}, expected {list(expect_turns)}); re-run Chat Memory")
        if undo and not on_disk.turns:
            raise SessionError(f"chat session {name!r} has no turn to undo")
        session = replace(on_disk, turns=() if reset else on_disk.turns[:-1] if undo else on_disk.turns)
        ref, ref_label, width, height = _resolve_reference(engine, session, reference, images, mask, strength,
                                                           width, height)
        eva = ("eva",) if images is not None or (history_features == "eva" and session.turns) else ()
        with _stage(stage, callback, "mllm", *eva) as step_callback:
            # 3) prompt: the history as the model saw it + this turn
            instruction, ids, feats, new = _prompt(engine, session, message, images, history_features, force_image)
            # 4) MLLM: prefill only what the prefix cache lacks
            features, reply, stats = _encode(engine, ids, feats, settings, seed, step_callback, cache)
        with _stage(stage, callback, "unet", "vae") as step_callback:
            # 5) decoder (+ reference latents, mask re-noise, paste-back)
            image = engine.decode_pixels(features, seed=seed, steps=steps, cfg=cfg, width=width, height=height,
                                         reference=ref, mask=mask, strength=strength, feather=feather,
                                         callback=step_callback)
        # 6) commit
        record_settings = dict(seed=seed, steps=steps, cfg=cfg, width=width, height=height,
                               reference=ref_label, strength=strength, feather=feather,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               var_cfg_scale=var_cfg_scale, feature_slice=feature_slice, force_image=force_image,
                               history_features=history_features)
        blocks = _cat(([new] if new is not None else []) + [features])  # (n_images + 1, 64, C)
        for value, what in ((blocks, "image features"), (image, "image")):
            rules.check_finite(value, f"the model's {what}", f"; nothing was saved to chat session {name!r} (a "
                                                             f"float16 overflow? try dtype fp32 or bf16)")
        record, files = turn_files(session.next_id, message, instruction, images, mask, reply, image, blocks,
                                    record_settings, stats)
        session = commit_turn(on_disk, record, files, follows=session.turns)
    return ChatResult(image=image, reply=reply, features=features, session=session, record=session.turns[-1])


def _stage(stage, callback, *names):
    return contextlib.nullcontext(callback) if stage is None else stage(*names)


def _prompt(engine, session: ChatSession, message: str, images, history_features: str, force_image: bool):
    """-> (instruction the model sees, prompt ids, (n_blocks, 64, C) block features, new images' features)."""
    n_images = 0 if images is None else images.shape[0]
    instruction = prompting.GENERATE_PREFIX + message if not session.turns and not n_images else message
    turns = session.history() + [prompting.Turn(user=instruction, user_images=n_images)]
    ids = prompting.prompt_ids(engine.tokenizer, turns, engine.mllm_cfg.n_query, "chat", force_image=force_image)
    past = _history_features(engine, session, history_features)
    new = engine.encode_images(images) if n_images else None
    return instruction, ids, _cat(past + ([new] if new is not None else [])), new


def _check_turn_args(message, images, mask, reference, strength, feather, history_features, seed):
    if not isinstance(message, str) or not message.strip():
        raise ValueError(f"message must be a non-empty string, got {message!r}")
    if images is not None:
        check_images(images, "images")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3)
                             or (mask.ndim == 3 and mask.shape[0] != 1)):
        raise ValueError(f"mask must be a float tensor (H, W) or (1, H, W), 1 = edit, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask is not None:
        rules.check_finite(mask, "mask")
    if isinstance(reference, torch.Tensor):
        rules.check_finite(reference, "reference image")
    if mask is not None and rules.empty_mask_rows(mask.reshape(1, *mask.shape[-2:])):
        raise ValueError(f"mask is empty (no value > {rules.EDIT_THRESHOLD}): nothing would change; paint the area "
                         f"to edit (1 = edit)")
    rules.check_feather(feather)
    if reference is None and (mask is not None or strength < 1.0):
        raise ValueError("a mask or strength < 1 needs a reference (reference='auto', 'previous' or an image): "
                         "the decoder starts from it and keeps it outside the mask")
    if isinstance(reference, str) and reference not in REFERENCES:
        raise ValueError(f"reference must be None, one of {REFERENCES} or a (1, H, W, 3) image tensor, "
                         f"got {reference!r}")
    if isinstance(reference, torch.Tensor) and (reference.ndim != 4 or reference.shape[0] != 1
                                                or reference.shape[-1] != 3):
        raise ValueError(f"reference image must be (1, H, W, 3), got {tuple(reference.shape)}")
    if history_features not in HISTORY_FEATURES:
        raise ValueError(f"history_features must be one of {HISTORY_FEATURES}, got {history_features!r}")
    rules.check_seed(seed)


def _auto_reference(session, prev, images, mask, strength):
    """'auto': the previous image when the decoder needs a reference (strength < 1 or a mask), else None."""
    if strength >= 1.0 and mask is None:
        return None
    if prev is not None:
        return "previous"
    if images is not None:
        return images[:1]
    raise SessionError(f"strength < 1 or an edit mask needs a reference: session {session.name!r} has no previous "
                       f"image yet and no input image was given")


def _resolve_reference(engine, session, reference, images, mask, strength, width, height):
    """reference -> (tensor or None, 'none'|'previous'|'image', width, height); size defaults: the previous image's."""
    prev = session.image() if session.turns else None
    if width is None or height is None:
        if prev is not None:
            width, height = width or prev.shape[2], height or prev.shape[1]
        else:
            width = width or engine.decoder_cfg.default_size
            height = height or engine.decoder_cfg.default_size
    rules.check_size(width, height)
    if isinstance(reference, str) and reference == "auto":
        reference = _auto_reference(session, prev, images, mask, strength)
    if reference is None:
        return None, "none", width, height
    label = "image"
    if isinstance(reference, str):
        if prev is None:
            raise SessionError(f"reference='previous' needs an earlier turn with an image; session "
                               f"{session.name!r} has none (first turn: give a reference image or none)")
        reference, label = prev, "previous"
    if tuple(reference.shape[1:3]) != (height, width):
        raise ValueError(f"reference image is {reference.shape[2]}x{reference.shape[1]} but this turn is "
                         f"{width}x{height}; set width/height to the reference's size")
    if mask is not None and tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} but this turn is {width}x{height}; "
                         f"give a mask of the image's size")
    return reference.float(), label, width, height


def _history_features(engine, session: ChatSession, mode: str) -> list:
    """Block features of every past turn in prompt order; mode 'eva' re-encodes past generated images."""
    parts = []
    for turn in session.turns:
        f = session.features(turn)  # (n_user + 1, 64, C)
        if mode == "eva":
            f = torch.cat([f[:-1], engine.encode_images(session.image(turn))])
        parts.append(f)
    return parts


def _cat(parts):
    return torch.cat(parts) if parts else None


def _encode(engine, ids, feats, settings, seed, callback, cache):
    """B=1 decode with prefix reuse -> ((1, 64, C) features, reply text, stats)."""
    blocks = block_digests(ids, feats, engine.image_ids)
    prefix = cache.lookup(ids, blocks) if cache is not None else None
    result = engine.generate_tokens([ids], [feats], settings, [seed], callback, prefix=prefix,
                                    keep_prompt_cache=cache is not None)[0]
    if cache is not None:
        cache.store(ids, blocks, result.prompt_cache)
    if result.features is None:
        raise RuntimeError(f"the model produced no image within {settings.max_new_tokens} tokens; "
                           f"enable force_image or raise max_new_tokens")
    stats = {"prompt_tokens": len(ids), "reused_tokens": prefix.length if prefix is not None else 0}
    return result.features.float().cpu()[None], engine.reply_text(result.ids), stats
