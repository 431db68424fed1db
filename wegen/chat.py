"""Chat memory (an extension): sessions of turns on disk, prefix KV reuse, and one chat turn.

The release keeps no history (architecture reference 3.3). Here a session is an ordered list of
turns; turn N's prompt is SEED-X's multi-turn template (prompting.conversation_text) over every
earlier turn, each rendered exactly as the model saw it when it was the current turn (so the
token ids of the history never change). Past generated images re-enter as image blocks whose 64
slot embeddings are in_proj(stored features) (reference 3.3, option ii; the default) or
in_proj(EVA(stored PNG)) (option i, history_features="eva"). Input images keep their EVA features.

The KV cache of each prompt's prefill stays in a byte-bounded LRU (PrefixCache); the next turn
reuses the longest stored prefix, so it prefills only its new tokens and re-encodes no past image.

On disk, one folder per session (names checked by check_session_name):
  <root>/<name>/session.json      format, revision, next_id and the turns (text, settings, files)
  <root>/<name>/turns/<id>/       user_<i>.png, mask.png, image.png, features.json (base64 float32)
  <root>/<name>/.lock             one turn at a time, across threads and processes
Each file is written to a temp file in its folder, fsynced and os.replace'd. A turn is computed in
memory, staged in a hidden folder, renamed into place, and committed by replacing session.json
last: a turn that fails or is interrupted leaves every existing file byte-identical.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import html
import io
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from . import decoder, mllm, prompting
from .engine import _check_sampling, check_images

SESSION_FILE = "session.json"
LOCK_FILE = ".lock"
FORMAT = "wegen-chat-session"
FEATURES_FORMAT = "wegen-chat-features"
VERSION = 1
HISTORY_FEATURES = ("stored", "eva")  # how past generated images re-enter the prompt
REFERENCES = ("previous", "auto")  # named decoder references (besides None and an image tensor)
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30  # 1 GiB: ~2000 tokens of Llama-2-7B KV in bf16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_FILE_RE = re.compile(r"^turns/(\d{6})/([a-z0-9_]+\.(?:png|json))$")


class SessionError(ValueError):
    """A chat session cannot be used as asked (bad name, busy, changed, nothing to undo)."""


class CorruptSessionError(SessionError):
    """A session file cannot be read; it is never overwritten."""


# Names and folders -------------------------------------------------------------------------------

def check_session_name(name) -> str:
    """A session name that stays inside the sessions folder: 1-64 of A-Z a-z 0-9 _ . -, no '..'."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name \
            or name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise SessionError(f"session name must be 1-64 characters of letters, digits, '_', '.', '-', start with a "
                           f"letter or digit and contain no '..' (it names a folder inside the sessions folder), "
                           f"got {name!r}")
    return name


def session_folder(root: str, name: str) -> str:
    """<root>/<name>, checked to resolve inside root (a symlinked session folder is refused)."""
    check_session_name(name)
    if not isinstance(root, str) or not root:
        raise SessionError(f"sessions folder must be a non-empty path, got {root!r}")
    folder = os.path.join(os.path.abspath(root), name)
    if os.path.dirname(os.path.realpath(folder)) != os.path.realpath(root):
        raise SessionError(f"session {name!r} resolves outside the sessions folder {os.path.abspath(root)}")
    return folder


def list_sessions(root: str) -> list[str]:
    """Names of the session folders under root (sorted)."""
    if not os.path.isdir(root):
        return []
    names = []
    for n in sorted(os.listdir(root)):
        with contextlib.suppress(SessionError):
            if os.path.isdir(session_folder(root, n)):
                names.append(n)
    return names


# The lock: a threading lock + an OS file lock on <session>/.lock ----------------------------------

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def session_lock(root: str, name: str, blocking: bool = True):
    """Hold the session for one change. Not re-entrant; blocking=False raises SessionError when busy."""
    folder = session_folder(root, name)
    os.makedirs(folder, exist_ok=True)
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(os.path.realpath(folder), threading.Lock())
    if not tlock.acquire(blocking):
        raise SessionError(f"chat session {name!r} is busy with another turn; try again when it finishes")
    try:
        with open(os.path.join(folder, LOCK_FILE), "a+b") as f:
            if not _lock_file(f, blocking):
                raise SessionError(f"chat session {name!r} is busy in another process; try again when it finishes")
            try:
                yield folder
            finally:
                _unlock_file(f)
    finally:
        tlock.release()


def _lock_file(f, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        import time
        while True:
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                time.sleep(0.05)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _unlock_file(f):
    try:
        import fcntl
    except ImportError:
        import msvcrt
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# Atomic files -------------------------------------------------------------------------------------

def write_atomic(path: str, data: bytes):
    """Temp file in the same folder, fsync, os.replace: readers see the old or the new file, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str):
    """Make the rename durable; best effort (some filesystems refuse): the new file is already in place."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def png_bytes(image: torch.Tensor, text: dict | None = None) -> bytes:
    """(H, W, 3) / (1, H, W, 3) float 0..1 or (H, W) mask -> PNG bytes (8-bit)."""
    from PIL import Image, PngImagePlugin

    from .images import to_pil

    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, str(v))
    if image.ndim == 2:
        pil = Image.fromarray((image.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy(), mode="L")
    else:
        pil = to_pil(image[0] if image.ndim == 4 else image)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def features_bytes(features: torch.Tensor) -> bytes:
    """(n, 64, C) float32 -> features.json bytes (base64 of little-endian float32: exact round trip)."""
    f = features.detach().float().cpu().contiguous()
    payload = {"format": FEATURES_FORMAT, "shape": list(f.shape), "dtype": "float32",
               "data": base64.b64encode(f.numpy().astype("<f4").tobytes()).decode("ascii")}
    return json.dumps(payload).encode("utf-8")


def _features_from_bytes(data: bytes, path: str) -> torch.Tensor:
    import numpy as np

    try:
        payload = json.loads(data)
        shape = [int(s) for s in payload["shape"]]
        if payload.get("format") != FEATURES_FORMAT or payload.get("dtype") != "float32":
            raise ValueError("not a wegen features file")
        flat = np.frombuffer(base64.b64decode(payload["data"], validate=True), dtype="<f4")
        return torch.from_numpy(flat.astype(np.float32).reshape(shape).copy())
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptSessionError(f"chat features file {path} is corrupt ({e}); the session was left untouched") from e


# Sessions -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TurnRecord:
    """One stored turn. File paths are relative to the session folder (turns/<id>/...)."""

    id: int
    user: str  # as typed
    instruction: str  # the user text the model saw (T2I prefix on an image-less first turn)
    user_images: tuple = ()
    reply: str = ""
    image: str = ""
    mask: str | None = None
    features: str = ""  # features.json: (len(user_images) + 1, 64, C), prompt order
    features_sha256: str = ""
    settings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    created: str = ""

    def files(self) -> list[str]:
        return [*self.user_images, self.image, self.features, *([self.mask] if self.mask else [])]


@dataclass(frozen=True)
class ChatSession:
    """A snapshot of a session: what session.json said when it was read (or just written)."""

    root: str
    name: str
    turns: tuple = ()
    revision: int = 0
    next_id: int = 1
    created: str = ""

    @property
    def folder(self) -> str:
        return session_folder(self.root, self.name)

    @property
    def turn_ids(self) -> tuple:
        return tuple(t.id for t in self.turns)

    def path(self, rel: str) -> str:
        return os.path.join(self.folder, *rel.split("/"))

    def history(self) -> list[prompting.Turn]:
        """The turns as prompting.Turn, each with the instruction the model saw."""
        return [prompting.Turn(user=t.instruction, user_images=len(t.user_images), reply=t.reply, reply_images=1)
                for t in self.turns]

    def features(self, turn: TurnRecord) -> torch.Tensor:
        """(len(user_images) + 1, 64, C) stored block features of one turn (checksum verified)."""
        path = self.path(turn.features)
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != turn.features_sha256:
            raise CorruptSessionError(f"chat features file {path} does not match its checksum in "
                                      f"{self.path(SESSION_FILE)}; the session was left untouched")
        return _features_from_bytes(data, path)

    def image(self, turn: TurnRecord | None = None) -> torch.Tensor:
        """(1, H, W, 3) generated image of a turn (default: the last one), read from its PNG."""
        from .images import load_image

        turn = turn or self.turns[-1]
        return load_image(self.path(turn.image))

    def to_json(self) -> bytes:
        data = {"format": FORMAT, "version": VERSION, "name": self.name, "revision": self.revision,
                "next_id": self.next_id, "created": self.created,
                "turns": [dict(vars(t), user_images=list(t.user_images)) for t in self.turns]}
        return json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8")


def load_session(root: str, name: str) -> ChatSession:
    """Read <root>/<name>/session.json; a missing one is an empty session. CorruptSessionError on bad data."""
    folder = session_folder(root, name)
    path = os.path.join(folder, SESSION_FILE)
    if not os.path.exists(path):
        return ChatSession(root=os.path.abspath(root), name=name)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        session = _parse_session(root, name, data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise CorruptSessionError(
            f"chat session file {path} is corrupt ({type(e).__name__}: {e}); it was left untouched: "
            f"move the folder {folder} away to start over, or use another session name") from e
    for turn in session.turns:
        for rel in turn.files():
            if not os.path.isfile(session.path(rel)):
                raise CorruptSessionError(f"chat session {path} lists {rel} but {session.path(rel)} is missing; "
                                          f"it was left untouched")
    return session


def _parse_session(root, name, data) -> ChatSession:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a WeGen chat session (format must be {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r} is not supported (this build reads {VERSION})")
    turns = []
    for raw in data["turns"]:
        turn = TurnRecord(id=int(raw["id"]), user=str(raw["user"]), instruction=str(raw["instruction"]),
                          user_images=tuple(raw["user_images"]), reply=str(raw["reply"]), image=raw["image"],
                          mask=raw.get("mask"), features=raw["features"], features_sha256=str(raw["features_sha256"]),
                          settings=dict(raw["settings"]), stats=dict(raw.get("stats", {})),
                          created=str(raw.get("created", "")))
        for rel in turn.files():
            m = _FILE_RE.match(rel) if isinstance(rel, str) else None
            if not m or int(m.group(1)) != turn.id:
                raise ValueError(f"turn {turn.id} names a file outside turns/{turn.id:06d}/: {rel!r}")
        turns.append(turn)
    ids = [t.id for t in turns]
    next_id = int(data["next_id"])
    if len(set(ids)) != len(ids) or any(i >= next_id or i < 1 for i in ids):
        raise ValueError(f"turn ids {ids} must be distinct, positive and below next_id {next_id}")
    return ChatSession(root=os.path.abspath(root), name=name, turns=tuple(turns), revision=int(data["revision"]),
                       next_id=next_id, created=str(data.get("created", "")))


def session_revision(root: str, name: str) -> int:
    """Revision counter of a session (0 when it has no file yet); bumps on every change."""
    return load_session(root, name).revision


def _save(session: ChatSession) -> ChatSession:
    session = replace(session, revision=session.revision + 1, created=session.created or _now())
    write_atomic(os.path.join(session.folder, SESSION_FILE), session.to_json())
    return session


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _remove_turn_folders(session: ChatSession, turns):
    for t in turns:
        shutil.rmtree(os.path.join(session.folder, "turns", f"{t.id:06d}"), ignore_errors=True)


def _require(root, name) -> ChatSession:
    session = load_session(root, name)
    if not os.path.exists(os.path.join(session.folder, SESSION_FILE)):
        raise SessionError(f"no chat session named {name!r} in {os.path.abspath(root)}")
    return session


def reset_session(root: str, name: str, blocking: bool = True) -> ChatSession:
    """Drop every turn (the session keeps its name and folder)."""
    with session_lock(root, name, blocking):
        session = load_session(root, name)
        if not session.turns and session.revision == 0:
            return session
        new = _save(replace(session, turns=()))
        _remove_turn_folders(session, session.turns)
        return new


def undo_turn(root: str, name: str, blocking: bool = True) -> ChatSession:
    """Remove the last turn."""
    _require(root, name)  # before locking: the lock would create a folder for a missing session
    with session_lock(root, name, blocking):
        session = _require(root, name)
        if not session.turns:
            raise SessionError(f"chat session {name!r} has no turn to undo")
        new = _save(replace(session, turns=session.turns[:-1]))
        _remove_turn_folders(session, session.turns[-1:])
        return new


def fork_session(root: str, name: str, new_name: str, k: int) -> ChatSession:
    """New session `new_name` holding copies of the first k turns of `name` (0 <= k <= len(turns))."""
    if check_session_name(new_name) == check_session_name(name):
        raise SessionError(f"fork needs a new session name, got {new_name!r} twice")
    _check_fork(_require(root, name), load_session(root, new_name), k)  # before locking creates any folder
    first, second = sorted((name, new_name))
    with session_lock(root, first), session_lock(root, second):
        src, dst = _require(root, name), load_session(root, new_name)
        _check_fork(src, dst, k)
        copied = []
        try:
            os.makedirs(os.path.join(dst.folder, "turns"), exist_ok=True)
            for t in src.turns[:k]:
                target = os.path.join(dst.folder, "turns", f"{t.id:06d}")
                shutil.copytree(os.path.join(src.folder, "turns", f"{t.id:06d}"), target)
                copied.append(target)
            return _save(replace(dst, turns=src.turns[:k], next_id=src.next_id, revision=0, created=""))
        except BaseException:
            for c in copied:
                shutil.rmtree(c, ignore_errors=True)
            raise


def _check_fork(src: ChatSession, dst: ChatSession, k):
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(src.turns):
        raise SessionError(f"fork turn k must be an integer in 0..{len(src.turns)} (turns of {src.name!r}), got {k!r}")
    if dst.turns or os.path.exists(os.path.join(dst.folder, SESSION_FILE)):
        raise SessionError(f"session {dst.name!r} already exists; fork into a new name")


def commit_turn(session: ChatSession, record: TurnRecord, files: dict) -> ChatSession:
    """Write a turn's files (staged, renamed into place) and then session.json; undo all of it on failure.

    Call under session_lock with the snapshot read under that lock.
    """
    turns_dir = os.path.join(session.folder, "turns")
    made_dir = not os.path.isdir(turns_dir)
    os.makedirs(turns_dir, exist_ok=True)
    tid = max(session.next_id, record.id)
    while os.path.exists(os.path.join(turns_dir, f"{tid:06d}")):  # leftover of a killed commit: skip its id
        tid += 1
    record = _renumber(record, tid)
    stage = tempfile.mkdtemp(prefix=".stage-", dir=turns_dir)
    final = os.path.join(turns_dir, f"{tid:06d}")
    try:
        for rel, data in files.items():
            with open(os.path.join(stage, rel.rsplit("/", 1)[-1]), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(stage, final)
        return _save(replace(session, turns=session.turns + (record,), next_id=tid + 1))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        if made_dir:
            shutil.rmtree(turns_dir, ignore_errors=True)
        raise


def _renumber(record: TurnRecord, tid: int) -> TurnRecord:
    def move(rel):
        return None if rel is None else f"turns/{tid:06d}/{rel.rsplit('/', 1)[-1]}"
    return replace(record, id=tid, user_images=tuple(move(r) for r in record.user_images), image=move(record.image),
                   mask=move(record.mask), features=move(record.features))


# Prefix reuse: an LRU of prompt KV caches bounded in bytes ---------------------------------------

def cache_nbytes(cache) -> int:
    """Bytes of a transformers KV cache's key/value tensors (5.x `layers`, 4.x `key_cache`/`value_cache`)."""
    tensors = []
    for layer in getattr(cache, "layers", None) or []:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    tensors += list(getattr(cache, "key_cache", None) or []) + list(getattr(cache, "value_cache", None) or [])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def block_digests(ids: list[int], features: torch.Tensor | None, image_ids) -> dict:
    """{slot start position: sha256 of that block's (64, C) float32 features} for a prompt."""
    starts = prompting.image_slot_positions(ids, image_ids)
    if not starts:
        return {}
    f = features.detach().float().cpu().contiguous()
    return {s: hashlib.sha256(f[i].numpy().tobytes()).hexdigest() for i, s in enumerate(starts)}


@dataclass
class _Entry:
    ids: tuple
    blocks: dict
    cache: object
    nbytes: int


class PrefixCache:
    """Prompt KV caches keyed by token ids + image-block digests; lookup finds the longest shared prefix."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    @staticmethod
    def shared_length(entry: _Entry, ids, blocks: dict) -> int:
        """Tokens of `ids` whose KV `entry` holds: equal ids, and equal features for every block started inside."""
        n, limit = 0, min(len(entry.ids), len(ids))
        while n < limit and entry.ids[n] == ids[n]:
            n += 1
        for start in set(entry.blocks) | set(blocks):
            if start < n and entry.blocks.get(start) != blocks.get(start):
                n = start
        return n

    def lookup(self, ids, blocks: dict) -> mllm.Prefix | None:
        """The longest stored prefix of `ids` (at most len(ids) - 1 tokens: one must stay to prefill)."""
        ids = tuple(ids)
        with self._lock:
            best, best_len = None, 0
            for key, entry in self._entries.items():
                n = min(self.shared_length(entry, ids, blocks), len(ids) - 1)
                if n > best_len:
                    best, best_len = key, n
            if best is None:
                return None
            self._entries.move_to_end(best)
            return mllm.Prefix(self._entries[best].cache, best_len)

    def store(self, ids, blocks: dict, cache):
        """Keep the prompt cache of `ids`; drops entries it contains, then the least recently used over budget."""
        entry = _Entry(tuple(ids), dict(blocks), cache, cache_nbytes(cache))
        if entry.nbytes > self.max_bytes:
            return
        key = (entry.ids, tuple(sorted(entry.blocks.items())))
        with self._lock:
            contained = [k for k, e in self._entries.items()
                         if self.shared_length(e, entry.ids, entry.blocks) == len(e.ids)]
            for k in contained:
                self.nbytes -= self._entries.pop(k).nbytes
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._entries.popitem(last=False)[1].nbytes


_PREFIX_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PREFIX_CACHES_GUARD = threading.Lock()


def engine_prefix_cache(engine) -> PrefixCache:
    """The shared PrefixCache of one engine (caches of one model never serve another)."""
    with _PREFIX_CACHES_GUARD:
        if engine not in _PREFIX_CACHES:
            _PREFIX_CACHES[engine] = PrefixCache()
        return _PREFIX_CACHES[engine]


def clear_prefix_caches():
    with _PREFIX_CACHES_GUARD:
        for c in _PREFIX_CACHES.values():
            c.clear()


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
              expect_turns=None, prefix_cache="auto", callback=None, stage=None) -> ChatResult:
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
        prefix_cache: "auto" (the engine's shared LRU), None (full recompute) or a PrefixCache.
        callback: the engine's per-step callback (raising in it stops the turn; nothing is saved).
        stage: optional `stage(*module_names)` -> context manager yielding the callback for that stage
            ("mllm"/"eva", then "unet"/"vae"): how ComfyUI puts each stage's modules on the GPU.
        Other arguments: see WeGenEngine.encode / WeGenEngine.decode.
    """
    # 1) check inputs (before touching the session)
    decoder.check_decode_args(steps, cfg, strength)
    _check_turn_args(message, images, mask, reference, strength, feather, history_features, seed)
    mask = None if mask is None else mask.reshape(1, *mask.shape[-2:]).float()  # (1, H, W)
    cache = engine_prefix_cache(engine) if prefix_cache == "auto" else prefix_cache
    if cache is not None and not isinstance(cache, PrefixCache):
        raise ValueError(f"prefix_cache must be 'auto', None or a PrefixCache, got {prefix_cache!r}")
    settings = mllm.DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   var_cfg_scale=var_cfg_scale, feature_slice=feature_slice)
    _check_sampling(temperature, top_p, max_new_tokens)

    with session_lock(root, name):
        # 2) the session as it is now
        session = load_session(root, name)
        if expect_turns is not None and tuple(expect_turns) != session.turn_ids:
            raise SessionError(f"chat session {name!r} changed since this chat state was made (it holds turns "
                               f"{list(session.turn_ids)}, expected {list(expect_turns)}); re-run Chat Memory")
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
            image = engine.decode(features, seed=seed, steps=steps, cfg=cfg, width=width, height=height,
                                  reference=ref, mask=mask, strength=strength, feather=feather,
                                  callback=step_callback)
        # 6) commit
        record_settings = dict(seed=seed, steps=steps, cfg=cfg, width=width, height=height,
                               reference=ref_label, strength=strength, feather=feather,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               var_cfg_scale=var_cfg_scale, feature_slice=feature_slice, force_image=force_image,
                               history_features=history_features)
        blocks = _cat(([new] if new is not None else []) + [features])  # (n_images + 1, 64, C)
        record, files = _turn_files(session.next_id, message, instruction, images, mask, reply, image, blocks,
                                    record_settings, stats)
        session = commit_turn(session, record, files)
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
    if mask is not None and not bool((mask > 0.5).any()):
        raise ValueError("mask is empty (no value > 0.5): nothing would change; paint the area to edit (1 = edit)")
    if isinstance(feather, bool) or not isinstance(feather, int) or feather < 0:
        raise ValueError(f"feather must be a non-negative integer (pixels), got {feather!r}")
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
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"seed must be an integer in 0..2**64-1, got {seed!r}")


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
    decoder.check_size(width, height)
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
    result = engine._decode([ids], [feats], settings, [seed], callback, prefix=prefix,
                            keep_prompt_cache=cache is not None)[0]
    if cache is not None:
        cache.store(ids, blocks, result.prompt_cache)
    if result.features is None:
        raise RuntimeError(f"the model produced no image within {settings.max_new_tokens} tokens; "
                           f"enable force_image or raise max_new_tokens")
    stats = {"prompt_tokens": len(ids), "reused_tokens": prefix.length if prefix is not None else 0}
    return result.features.float().cpu()[None], engine._reply_text(result.ids), stats


def _turn_files(tid, message, instruction, images, mask, reply, image, blocks, settings, stats):
    """A TurnRecord for turn `tid` and {relative path: bytes} of its files."""
    folder = f"turns/{tid:06d}"
    files = {}
    user_images = []
    for i in range(0 if images is None else images.shape[0]):
        user_images.append(f"{folder}/user_{i}.png")
        files[user_images[-1]] = png_bytes(images[i])
    mask_rel = None
    if mask is not None:
        mask_rel = f"{folder}/mask.png"
        files[mask_rel] = png_bytes(mask.reshape(mask.shape[-2:]))
    files[f"{folder}/image.png"] = png_bytes(image[0], {"message": message, "seed": settings["seed"]})
    files[f"{folder}/features.json"] = features_bytes(blocks)
    record = TurnRecord(id=tid, user=message, instruction=instruction, user_images=tuple(user_images), reply=reply,
                        image=f"{folder}/image.png", mask=mask_rel, features=f"{folder}/features.json",
                        features_sha256=hashlib.sha256(files[f"{folder}/features.json"]).hexdigest(),
                        settings=settings, stats=stats, created=_now())
    return record, files


# Views: a JSON summary (the ComfyUI panel) and an HTML transcript --------------------------------

def session_summary(session: ChatSession) -> dict:
    """What a UI shows: the turns' texts, settings and file paths (relative to the session folder)."""
    return {"name": session.name, "revision": session.revision,
            "turns": [{"id": t.id, "user": t.user, "reply": t.reply, "image": t.image,
                       "user_images": list(t.user_images), "mask": t.mask, "settings": t.settings,
                       "stats": t.stats, "created": t.created}
                      for t in session.turns]}


def session_file(root: str, name: str, rel: str) -> str:
    """Absolute path of a file the session lists (a turn's PNG); SessionError for anything else."""
    session = load_session(root, name)
    for turn in session.turns:
        if rel in turn.files() and rel.endswith(".png"):
            return session.path(rel)
    raise SessionError(f"{rel!r} is not an image of chat session {name!r}")


def write_transcript(session: ChatSession, path: str, title: str | None = None) -> str:
    """An HTML page with every turn (user text, input images, reply, image); links relative to `path`."""
    base = os.path.dirname(os.path.abspath(path))

    def img(rel, width=192):
        src = html.escape(os.path.relpath(session.path(rel), base).replace(os.sep, "/"))
        return f'<a href="{src}"><img src="{src}" width="{width}"></a>'

    rows = []
    for i, t in enumerate(session.turns, 1):
        inputs = "".join(img(r, 96) for r in t.user_images) + (img(t.mask, 96) if t.mask else "")
        s = t.settings
        rows.append(f"<section><h2>Turn {i}</h2><p class=user><b>User:</b> {html.escape(t.user)}</p>{inputs}"
                    f"<p class=reply><b>WeGen:</b> {html.escape(t.reply) or '<i>(image)</i>'}</p>{img(t.image)}"
                    f"<p class=meta>seed {s.get('seed')}, {s.get('steps')} steps, cfg {s.get('cfg')}, "
                    f"reference {s.get('reference')}, strength {s.get('strength')}; prompt "
                    f"{t.stats.get('prompt_tokens')} tokens, {t.stats.get('reused_tokens')} reused</p></section>")
    title = title or f"WeGen chat: {session.name}"
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:50em}section{border-top:1px solid #ccc}"
            "img{image-rendering:pixelated;border:1px solid #ccc;margin:2px}.meta{color:#777;font-size:small}</style>"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(rows) + "\n")
    write_atomic(path, page.encode("utf-8"))
    return path
