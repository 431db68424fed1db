"""What every training stage shares: seeding, a resumable stage checkpoint, progress, the lr schedule.

A stage is deterministic for a seed: its torch and Python generators are seeded from (seed, stage name),
and their states are saved with the weights and the optimiser, so a resumed run continues the same
sequence of batches it would have drawn without the interruption.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
import zlib

import torch

log = logging.getLogger(__name__)


def stage_seed(seed: int, stage: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(stage.encode())) % (2 ** 63)


class StageState:
    """Generators + step counter of one stage; `save`/`load` round-trip them with the modules and optimiser."""

    def __init__(self, seed: int, stage: str):
        self.stage = stage
        self.step = 0
        self.rng = random.Random(stage_seed(seed, stage))
        self.gen = torch.Generator("cpu").manual_seed(stage_seed(seed, stage))

    def save(self, path: str, modules: dict, optimizer, extra: dict | None = None):
        data = {"stage": self.stage, "step": self.step, "rng": self.rng.getstate(), "gen": self.gen.get_state(),
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "optimizer": optimizer.state_dict() if optimizer is not None else None, "extra": extra or {}}
        tmp = f"{path}.tmp"
        torch.save(data, tmp)
        os.replace(tmp, path)

    def load(self, path: str, modules: dict, optimizer) -> dict:
        data = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
        if data.get("stage") != self.stage:
            raise ValueError(f"{path} holds stage {data.get('stage')!r}, not {self.stage!r}")
        for k, m in modules.items():
            m.load_state_dict(data["modules"][k])
        if optimizer is not None and data["optimizer"] is not None:
            optimizer.load_state_dict(data["optimizer"])
        self.step = data["step"]
        self.rng.setstate(data["rng"])
        self.gen.set_state(data["gen"])
        return data["extra"]


def load_modules(path: str, modules: dict):
    """Only the weights of a finished stage's checkpoint (the next stage starts from them)."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    for k, m in modules.items():
        m.load_state_dict(data["modules"][k])
    return data.get("extra", {})


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine to floor * base (the release's schedule shape)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


class Progress:
    """A tqdm bar on stderr (when it is a terminal or tqdm is present) plus a log line every `every` steps."""

    def __init__(self, stage: str, total: int, start: int, log_file: str | None, every: int = 50):
        self.stage, self.total, self.every = stage, total, every
        self.t0, self.start = time.time(), start
        self.log_file = log_file
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, file=sys.stderr, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            self.bar = None

    def update(self, step: int, losses: dict):
        text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        if step % self.every == 0 or step == self.total:
            rate = (time.time() - self.t0) / max(1, step - self.start)
            line = f"{self.stage} step {step}/{self.total} {text} ({rate:.2f} s/step)"
            log.info(line)
            if self.log_file:
                with open(self.log_file, "a", encoding="utf-8") as f:
                    f.write(line + "\n")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_steps(state: StageState, total: int, ckpt_path: str, modules: dict, optimizer, step_fn, *,
              base_lr: float, warmup: int, log_file: str | None, save_every: int = 200, extra=None):
    """The loop every stage shares: lr schedule, one `step_fn()` -> losses dict, progress, periodic saves."""
    progress = Progress(state.stage, total, state.step, log_file)
    for m in modules.values():
        m.train()
    try:
        while state.step < total:
            set_lr(optimizer, cosine_lr(state.step, total, base_lr, warmup))
            losses = step_fn()
            state.step += 1
            progress.update(state.step, losses)
            if state.step % save_every == 0 or state.step == total:
                state.save(ckpt_path, modules, optimizer, extra() if callable(extra) else extra)
    finally:
        progress.close()
    for m in modules.values():
        m.eval()
