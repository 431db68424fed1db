"""Stage 2: the MLLM (transformers' LlamaForCausalLM + the two projections, wegen.mllm.WeGenMLLM).

As the release's ContinuousLVLMJointLLMSDVAR trains it: every image block's 64 inner embeddings are
in_proj(features) (teacher forcing: input images with their own features, generated images with their
target features plus a little noise, so the VAR feed-back tolerates its own errors); the feature of slot
k is regressed from the last-layer hidden state one position earlier (<img> for k = 0), through
out_proj, with MSE + cosine; text replies get cross-entropy. Loss = CE + MSE / feature variance + cosine.
The data mix (wegen/toydata.py): text-to-image, understanding, Prompt Self-Rewriting with the engine's
rewrite template, and DIIC edits single- and multi-turn.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from .. import toydata
from ..mllm import MllmConfig, WeGenMLLM
from ..prompting import WeGenTokenizer
from ..rewrite import DEFAULT_TEMPLATE
from . import common
from .toymodel import EVA_TOY, LLAMA_TOY

TASK_WEIGHTS = {"t2i": 0.25, "understand": 0.15, "rewrite": 0.2, "edit": 0.4}
FEED_NOISE = 0.1  # x feature std, added to teacher-forced generated features


def new_mllm(vocab_size: int) -> WeGenMLLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dict(LLAMA_TOY, vocab_size=vocab_size))
    return WeGenMLLM(MllmConfig(hidden=config.hidden_size, feature_dim=EVA_TOY.width), LlamaForCausalLM(config))


def load_diic(out: str, tower) -> tuple[list[dict], torch.Tensor, list[list[int]]]:
    """DIIC sequences, the tower features of every frame, and per sequence the frames' row in those features."""
    import numpy as np
    from PIL import Image

    from .tower import tower_features

    folder = os.path.join(out, "diic")
    with open(os.path.join(folder, "sequences.jsonl"), encoding="utf-8") as f:
        sequences = [json.loads(line) for line in f if line.strip()]
    paths = sorted({p for s in sequences for p in s["images"]})
    row = {p: i for i, p in enumerate(paths)}
    feats = []
    with torch.no_grad():
        for i in range(0, len(paths), 256):
            pixels = np.stack([np.asarray(Image.open(os.path.join(folder, p)).convert("RGB"))
                               for p in paths[i:i + 256]])
            feats.append(tower_features(tower, toydata.to_pixels(pixels)))
    return sequences, torch.cat(feats), [[row[p] for p in s["images"]] for s in sequences]


class Data:
    """Draws conversations by task weight and turns a batch of them into tensors."""

    def __init__(self, out: str, tokenizer: WeGenTokenizer, n_slots: int):
        from .tower import new_tower

        self.tokenizer, self.n_slots = tokenizer, n_slots
        bank = torch.load(os.path.join(out, "bank.pt"), map_location="cpu")
        tower = new_tower(torch.Generator())
        common.load_modules(os.path.join(out, "tower.pt"), {"tower": tower})
        tower.eval()
        self.sequences, diic_feats, self.diic_rows = load_diic(out, tower)
        n_bank = bank["real"].shape[0]
        self.canonical = bank["canonical"]
        self.real = torch.cat([bank["real"], diic_feats])  # ("real", i): bank rows, then DIIC frames
        self.real_scene = bank["real_scene"].tolist()
        self.n_bank = n_bank
        self.feature_std = float(bank["feature_std"])

    def conversation(self, rng, task: str):
        if task == "t2i":
            return toydata.t2i(rng)
        if task == "understand":
            return toydata.understand(rng, self.n_bank, self.real_scene)
        if task == "rewrite":
            return toydata.rewrite(rng, DEFAULT_TEMPLATE)
        k = rng.randrange(len(self.sequences))
        rows = [self.n_bank + r for r in self.diic_rows[k]]
        return toydata.edit_chain(rng, self.sequences[k], rows)

    def features(self, ref) -> torch.Tensor:
        kind, i = ref
        return self.canonical[i] if kind == "scene" else self.real[i]

    def batch(self, rng, size: int) -> dict:
        """One task per batch (by TASK_WEIGHTS): similar lengths, so little padding."""
        task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
        convs = [self.conversation(rng, task) for _ in range(size)]
        toks = [toydata.tokenize(c, self.tokenizer, self.n_slots) for c in convs]
        L = max(len(t.ids) for t in toks)
        ids = torch.zeros(size, L, dtype=torch.long)
        mask = torch.zeros(size, L, dtype=torch.long)
        loss_mask = torch.zeros(size, L, dtype=torch.bool)
        blocks = []  # (row, first slot position, features (64, C), generated)
        for b, (c, t) in enumerate(zip(convs, toks)):
            ids[b, :len(t.ids)] = torch.tensor(t.ids)
            mask[b, :len(t.ids)] = 1
            loss_mask[b, :len(t.ids)] = torch.tensor(t.loss_mask)
            blocks += [(b, s, self.features(ref), gen) for s, ref, gen in zip(t.slot_starts, c.blocks, c.generated)]
        return {"ids": ids, "mask": mask, "loss_mask": loss_mask, "blocks": blocks}


def losses(model: WeGenMLLM, batch: dict, feature_std: float, gen: torch.Generator | None, device) -> dict:
    """CE over reply tokens, MSE + cosine over generated image features (teacher-forced)."""
    ids, mask = batch["ids"].to(device), batch["mask"].to(device)
    n = model.cfg.n_gen_tokens
    embeds = model.embed_tokens(ids)  # (B, L, H)
    blocks = batch["blocks"]
    rows = torch.tensor([b for b, *_ in blocks], dtype=torch.long)
    starts = torch.tensor([s for _, s, *_ in blocks], dtype=torch.long)
    feats = torch.stack([f for *_, f, _ in blocks]).to(device) if blocks else None  # (N, 64, C)
    generated = torch.tensor([g for *_, g in blocks], dtype=torch.bool)
    if blocks:
        fed = feats.clone()
        if gen is not None and generated.any():
            noise = torch.randn(fed[generated].shape, generator=gen).to(device) * FEED_NOISE * feature_std
            fed[generated] = fed[generated] + noise
        slot_pos = starts[:, None] + torch.arange(n)[None]  # (N, 64)
        embeds = embeds.index_put((rows[:, None].expand(-1, n).to(device), slot_pos.to(device)),
                                  model.input_resampler(fed))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    h = model.forward_hidden(embeds, mask, positions)  # (B, L, H)
    out = {}
    lm = batch["loss_mask"].to(device)
    logits = model.logits(h[lm])  # (n_targets, V)
    targets = ids[:, 1:][lm[:, :-1]]
    out["ce"] = F.cross_entropy(logits, targets)
    if blocks and generated.any():
        g_rows, g_starts = rows[generated], starts[generated]
        src = g_starts[:, None] - 1 + torch.arange(n)[None]  # the position before each slot
        pred = model.output_resampler(h[g_rows[:, None].expand(-1, n).to(device), src.to(device)])  # (G, 64, C)
        target = feats[generated]
        out["mse"] = F.mse_loss(pred, target) / feature_std ** 2
        out["cos"] = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    else:
        out["mse"] = out["cos"] = torch.zeros((), device=device)
    return out


def train_mllm(out: str, steps: int, seed: int, device: str = "cpu", batch: int = 16, lr: float = 1e-3,
               log_file=None) -> str:
    path = f"{out}/stage2.pt"
    tokenizer = WeGenTokenizer(os.path.join(out, "tokenizer"))
    data = Data(out, tokenizer, n_slots=64)
    state = common.StageState(seed, "stage2")
    torch.manual_seed(common.stage_seed(seed, "stage2-init"))
    model = new_mllm(tokenizer.vocab_size).to(device)
    modules = {"mllm": model}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    if os.path.isfile(path):
        state.load(path, modules, opt)

    def step():
        parts = losses(model, data.batch(state.rng, batch), data.feature_std, state.gen, device)
        loss = parts["ce"] + parts["mse"] + parts["cos"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {k: v.item() for k, v in parts.items()}

    common.run_steps(state, steps, path, modules, opt, step, base_lr=lr, warmup=100, log_file=log_file,
                     extra={"feature_std": data.feature_std})
    return path
