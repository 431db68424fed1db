"""Tokenizer and chat template: text and image slots -> token ids.

Follows the release's `src/eval/inference.py` (T2I prompt) and SEED-X's SFT convention for
multi-turn and image-input prompts (see shared/reference/wegen-official-architecture.md, section 2).

The release uses the *slow* sentencepiece `LlamaTokenizer` of transformers 4.30 in legacy mode.
`WeGenTokenizer` reproduces that behaviour directly on top of sentencepiece, so the ids do not
depend on which transformers version a ComfyUI install carries:
  * the text is split on the added tokens (`<img>`, `<img_00000>`, ...);
  * whitespace next to an added token is stripped (4.30 strips plain added tokens both sides);
  * every remaining chunk is sentencepiece-encoded on its own, so it gets the dummy `▁` prefix;
  * BOS is added by hand, never by the encoder.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

# Token strings of SEED-X's 330 added tokens (FACT: vocab 32000 + 330 = 32330).
IMG_START, IMG_END = "<img>", "</img>"
N_IMG_SLOT_TOKENS = 100  # <img_00000> .. <img_00099>
N_LOC_TOKENS = 224  # <loc-0> .. <loc-223>


def img_slot_token(k: int) -> str:
    return f"<img_{k:05d}>"


def seedx_added_tokens() -> list[str]:
    """The 330 added token strings in SEED-X's order (ids come from added_tokens.json)."""
    tokens = [IMG_START, IMG_END]
    tokens += [img_slot_token(k) for k in range(N_IMG_SLOT_TOKENS)]
    tokens += ["<patch>", "</patch>"]
    tokens += [f"<loc-{k}>" for k in range(N_LOC_TOKENS)]
    tokens += ["<box_start>", "<box_end>"]
    return tokens


# Official T2I instruction prefix (inference.py: "[INST] Generate a painting: {caption} [/INST]\n").
GENERATE_PREFIX = "Generate a painting: "


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of the image-block tokens, looked up in the tokenizer (never hard-coded)."""

    start: int  # <img>
    end: int  # </img>
    slots: tuple[int, ...]  # <img_00000> .. <img_{n-1}>

    @property
    def n(self) -> int:
        return len(self.slots)


class WeGenTokenizer:
    """Slow-Llama-compatible tokenizer: sentencepiece model + added_tokens.json."""

    def __init__(self, folder: str):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - sentencepiece is a hard requirement
            raise ImportError("WeGen needs sentencepiece: pip install sentencepiece") from e
        model_path = os.path.join(folder, "tokenizer.model")
        added_path = os.path.join(folder, "added_tokens.json")
        for path in (model_path, added_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file missing: {path} (expected in the tokenizer folder {folder})")
        self.folder = folder
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        with open(added_path, encoding="utf-8") as f:
            self.added: dict[str, int] = {str(k): int(v) for k, v in json.load(f).items()}
        self.added_by_id = {v: k for k, v in self.added.items()}
        self.bos_id = self.sp.bos_id()  # 1 for Llama
        self.eos_id = self.sp.eos_id()  # 2 for Llama
        self.sp_size = self.sp.get_piece_size()
        self.vocab_size = max([self.sp_size - 1, *self.added.values()]) + 1
        # Longest match first so "<img_00001>" never splits as "<img" + ...
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._split_re = re.compile(f"({pattern})") if pattern else None

    def token_id(self, token: str) -> int:
        """Id of one added token, e.g. "<img>"; KeyError names the folder when absent."""
        if token not in self.added:
            raise KeyError(f"token {token!r} is not in {os.path.join(self.folder, 'added_tokens.json')}")
        return self.added[token]

    def image_token_ids(self, n_slots: int) -> ImageTokenIds:
        return ImageTokenIds(
            start=self.token_id(IMG_START),
            end=self.token_id(IMG_END),
            slots=tuple(self.token_id(img_slot_token(k)) for k in range(n_slots)),
        )

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS, legacy slow-tokenizer rules (module docstring)."""
        if self._split_re is None:
            return self.sp.encode(text) if text else []
        parts = [p for p in self._split_re.split(text) if p != ""]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if part in self.added:
                ids.append(self.added[part])
                continue
            if i > 0 and parts[i - 1] in self.added:
                part = part.lstrip()
            if i + 1 < len(parts) and parts[i + 1] in self.added:
                part = part.rstrip()
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`; added tokens are kept as their strings unless skip_special."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.added_by_id or i in (self.bos_id, self.eos_id):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.added_by_id.get(i) or self.sp.id_to_piece(i))
            elif 0 <= i < self.sp_size:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)


def image_block(n_slots: int) -> str:
    """`<img><img_00000>..<img_{n-1}></img>`: the 66-token block of one image (n=64)."""
    return IMG_START + "".join(img_slot_token(k) for k in range(n_slots)) + IMG_END


@dataclass
class Turn:
    """One exchange of a conversation. `user_images` / `reply_images` count image blocks."""

    user: str
    user_images: int = 0
    reply: str = ""
    reply_images: int = 0
    extras: dict = field(default_factory=dict)


def user_message(text: str, n_images: int, n_slots: int, task: str) -> str:
    """User side of a turn: image blocks first (SEED-X edit demo), then the instruction.

    task="generate" without images is the release's T2I prompt ("Generate a painting: ...").
    task="chat" or images present use the instruction as typed (SEED-X edit/understanding form).
    """
    if task not in ("generate", "chat"):
        raise ValueError(f"task must be 'generate' or 'chat', got {task!r}")
    if n_images == 0 and task == "generate":
        return GENERATE_PREFIX + text
    return image_block(n_slots) * n_images + text


def conversation_text(turns: list[Turn], n_slots: int, task: str = "chat") -> str:
    """SEED-X multi-turn text (no BOS): "[INST] u1 [/INST]\\n" a1 "\\n[INST] u2 [/INST]\\n" a2 ...

    The last turn's reply may be empty: the model continues from there.
    """
    pieces = []
    for i, turn in enumerate(turns):
        lead = "[INST] " if i == 0 else "\n[INST] "
        user = user_message(turn.user, turn.user_images, n_slots, task if i == len(turns) - 1 else "chat")
        pieces.append(f"{lead}{user} [/INST]\n")
        pieces.append(turn.reply + image_block(n_slots) * turn.reply_images)
    return "".join(pieces)


def prompt_ids(tokenizer: WeGenTokenizer, turns: list[Turn], n_slots: int, task: str = "generate",
               force_image: bool = False) -> list[int]:
    """BOS + conversation ids; with force_image the `<img>` id is appended (an extension)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(conversation_text(turns, n_slots, task))
    if force_image:
        ids.append(tokenizer.token_id(IMG_START))
    return ids


def image_slot_positions(ids: list[int], image_ids: ImageTokenIds) -> list[int]:
    """Start index of the 64 inner slots of each image block in `ids`, in order."""
    starts = []
    n = image_ids.n
    i = 0
    while i < len(ids):
        if ids[i] == image_ids.start and i + n + 1 < len(ids) + 1 and tuple(ids[i + 1:i + 1 + n]) == image_ids.slots:
            starts.append(i + 1)
            i += n + 1
        else:
            i += 1
    return starts


def clean_reply(text: str) -> str:
    """Reply text as the release shows it: every `<...>` tag removed, outer whitespace stripped."""
    return re.sub(r"<[^>]*>", "", text).strip()
