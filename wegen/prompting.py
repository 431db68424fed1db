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
User text never becomes control tokens (an extension): added-token strings typed by a user (`<img>`,
`<img_00003>`, `<loc-5>` ...) or found in a stored reply are encoded as plain text, only the template's
own image blocks are split out; `<s>`/`</s>` are plain text to sentencepiece anyway; and user text that
spells the template's turn markers `[INST]` / `[/INST]` (plain text in Llama's vocabulary, so they cannot
be escaped) is refused with a message naming the input.
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


TURN_MARKERS = ("[INST]", "[/INST]")
MAX_ADDED_ID = 1 << 20


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def check_user_text(text, name: str = "prompt") -> str:
    """User text: a str, valid UTF-8 (no lone surrogates from undecodable argv bytes), no turn markers."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid UTF-8 text (an undecodable byte at character {e.start}); "
                         f"give the text in UTF-8") from None
    for marker in TURN_MARKERS:
        if marker in text:
            raise ValueError(f"{name} contains {marker!r}, the chat template's turn marker; user text may not "
                             f"start or end a turn, remove it")
    return text


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
            if os.path.isdir(path):
                raise TokenizerError(f"{path} is a folder where the tokenizer needs a file")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file missing: {path} (expected in the tokenizer folder {folder})")
        self.folder = folder
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_path} is not a sentencepiece tokenizer model "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.bos_id = self.sp.bos_id()  # 1 for Llama
        self.eos_id = self.sp.eos_id()  # 2 for Llama
        self.sp_size = self.sp.get_piece_size()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{model_path}: the tokenizer model has no BOS/EOS ids (bos {self.bos_id}, "
                                 f"eos {self.eos_id})")
        self.added = _read_added(added_path)
        self.added_by_id = {v: k for k, v in self.added.items()}
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
        return self.encode_spans([(text, False)])

    def encode_spans(self, spans) -> list[int]:
        """Ids of the concatenated (text, plain) spans: added tokens are split out of template spans only,
        so a plain span (user text, a stored reply) never yields a control token; otherwise as `encode`."""
        parts: list[tuple[str, bool]] = []  # (text, is added token), in order
        run = ""
        for text, plain in spans:
            last = 0
            if not plain and self._split_re is not None:
                for m in self._split_re.finditer(text):
                    parts += [(run + text[last:m.start()], False), (m.group(), True)]
                    run, last = "", m.end()
            run += text[last:]
        parts = [p for p in parts + [(run, False)] if p[0] != ""]
        ids: list[int] = []
        for i, (part, token) in enumerate(parts):
            if token:
                ids.append(self.added[part])
                continue
            if i > 0 and parts[i - 1][1]:
                part = part.lstrip()
            if i + 1 < len(parts) and parts[i + 1][1]:
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


def _read_added(path: str) -> dict:
    """added_tokens.json: an object of token string -> distinct integer id."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_ADDED_ID
                                            for v in raw.values()):
        raise TokenizerError(f"{path}: must be an object of token -> integer id in 0..{MAX_ADDED_ID - 1}")
    if len(set(raw.values())) != len(raw):
        raise TokenizerError(f"{path}: two added tokens share an id")
    return {str(k): v for k, v in raw.items()}


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
    return "".join(t for t, _ in _user_spans(text, n_images, n_slots, task))


def _user_spans(text: str, n_images: int, n_slots: int, task: str) -> list[tuple[str, bool]]:
    if task not in ("generate", "chat"):
        raise ValueError(f"task must be 'generate' or 'chat', got {task!r}")
    if n_images == 0 and task == "generate":
        return [(GENERATE_PREFIX, False), (text, True)]
    return [(image_block(n_slots) * n_images, False), (text, True)]


def conversation_spans(turns: list[Turn], n_slots: int, task: str = "chat") -> list[tuple[str, bool]]:
    """The conversation as (text, plain) spans: plain spans are user text and replies (see encode_spans)."""
    spans = []
    for i, turn in enumerate(turns):
        check_user_text(turn.user, "the message" if len(turns) > 1 else "the prompt")
        spans.append(("[INST] " if i == 0 else "\n[INST] ", False))
        spans += _user_spans(turn.user, turn.user_images, n_slots, task if i == len(turns) - 1 else "chat")
        spans += [(" [/INST]\n", False), (turn.reply, True), (image_block(n_slots) * turn.reply_images, False)]
    return spans


def conversation_text(turns: list[Turn], n_slots: int, task: str = "chat") -> str:
    """SEED-X multi-turn text (no BOS): "[INST] u1 [/INST]\\n" a1 "\\n[INST] u2 [/INST]\\n" a2 ...

    The last turn's reply may be empty: the model continues from there.
    """
    return "".join(t for t, _ in conversation_spans(turns, n_slots, task))


def prompt_ids(tokenizer: WeGenTokenizer, turns: list[Turn], n_slots: int, task: str = "generate",
               force_image: bool = False) -> list[int]:
    """BOS + conversation ids; with force_image the `<img>` id is appended (an extension)."""
    ids = [tokenizer.bos_id] + tokenizer.encode_spans(conversation_spans(turns, n_slots, task))
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
