"""Chat sessions on disk (an extension): names, the lock, turn records, undo/reset/fork, views.

One folder per session (names checked by check_session_name):
  <root>/<name>/session.json      format, revision, next_id and the turns (text, settings, files)
  <root>/<name>/turns/<id>/       user_<i>.png, mask.png, image.png, features.json (base64 float32)
  <root>/<name>/.lock             one change at a time, across threads and processes (wegen.locking)
Each file is written to a temp file in its folder, fsynced and os.replace'd (files.write_atomic). A
change (turn, reset, undo, fork) writes what its new state needs first (a turn: staged in a hidden
folder, renamed into place) and commits once, by replacing session.json. Clean-up deletes only what
the session.json on disk does not list, so an interrupt or a kill at any point leaves the old state or
the new one; what a killed writer left is removed when the session is next opened under its lock.
What a turn computes is in chat.py.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import html
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace

import torch

from . import prompting
from .files import fsync_dir, remove_temp_files, write_atomic
from .images import encode_image
from .locking import folder_lock
from .rules import check_finite

SESSION_FILE = "session.json"
FORMAT = "wegen-chat-session"
FEATURES_FORMAT = "wegen-chat-features"
VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # whole name: re.fullmatch
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_FILE_RE = re.compile(r"^turns/(\d{6})/([a-z0-9_]+\.(?:png|json))$")


class SessionError(ValueError):
    """A chat session cannot be used as asked (bad name, busy, changed, nothing to undo)."""


class CorruptSessionError(SessionError):
    """A session file cannot be read; it is never overwritten."""


# Names and folders -------------------------------------------------------------------------------

def check_session_name(name) -> str:
    """A session name that stays inside the sessions folder: 1-64 of A-Z a-z 0-9 _ . -, no '..'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name \
            or name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise SessionError(f"session name must be 1-64 characters of letters, digits, '_', '.', '-', start with a "
                           f"letter or digit and contain no '..', spaces, newlines or other control characters "
                           f"(it names a folder inside the sessions folder), got {name!r}")
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


# The lock (wegen.locking): one change at a time, across threads and processes ------------------------

@contextlib.contextmanager
def session_lock(root: str, name: str, blocking: bool = True, wait: float | None = None):
    """Hold the session for one change. Not re-entrant. When busy: SessionError naming the holder's pid, at once
    with blocking=False, else after `wait` seconds (default: $WEGEN_LOCK_WAIT, else 30)."""
    folder = session_folder(root, name)
    os.makedirs(folder, exist_ok=True)
    with folder_lock(folder, f"chat session {name!r}", wait=wait if blocking else 0, error=SessionError):
        yield folder


# Turn files -------------------------------------------------------------------------------------

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
        return check_finite(torch.from_numpy(flat.astype(np.float32).reshape(shape).copy()), "the features")
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
    if os.path.isdir(path):
        raise CorruptSessionError(f"chat session file {path} is a folder; it must be a file: move that folder "
                                  f"away, or use another session name")
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# Changes: each one commits once, by replacing session.json --------------------------------------
# A change writes what the new state needs (turn folders) first, then replaces session.json: the one atomic
# step. Clean-up deletes only what the session.json on disk does not list, decided by reading it again, so
# an interrupt at any point (even between the replace and its fsync) never deletes what session.json lists.

def open_session(root: str, name: str) -> ChatSession:
    """The session as on disk, after removing what killed writers left (.tmp-*, .stage-*, unlisted turn
    folders). Call under session_lock."""
    session = load_session(root, name)
    fsync_dir(session.folder)  # the session.json just read is durable before anything it doesn't list goes
    _remove_leftovers(session.root, name)
    return session


def _remove_leftovers(root: str, name: str, keep=()):
    """Delete temp files, staging folders and turn folders that neither session.json on disk nor `keep`
    (turn ids) lists. Nothing when session.json cannot be read."""
    try:
        listed = {*keep, *load_session(root, name).turn_ids}
    except (SessionError, OSError):
        return
    folder = session_folder(root, name)
    turns_dir = os.path.join(folder, "turns")
    remove_temp_files(folder)
    for entry in os.listdir(turns_dir) if os.path.isdir(turns_dir) else ():
        if entry.startswith(".stage-") or (re.fullmatch(r"\d{6}", entry) and int(entry) not in listed):
            shutil.rmtree(os.path.join(turns_dir, entry), ignore_errors=True)


def _after_failure(session: ChatSession):
    """A change failed or was interrupted: drop what it wrote that session.json on disk does not list (it
    may list the new state: the replace can have happened); a clean-up error never hides the first one."""
    with contextlib.suppress(Exception):
        _remove_leftovers(session.root, session.name, keep=session.turn_ids)


def _commit(old: ChatSession, new: ChatSession) -> ChatSession:
    """Replace session.json with `new` (revision + 1), then delete what only `old` listed."""
    new = replace(new, revision=old.revision + 1, created=new.created or old.created or _now())
    try:
        write_atomic(os.path.join(new.folder, SESSION_FILE), new.to_json())
    except BaseException:
        _after_failure(old)
        raise
    with contextlib.suppress(OSError):  # committed; what is left is removed on the next open
        _remove_leftovers(new.root, new.name)
    return new


def _require(root, name) -> ChatSession:
    session = open_session(root, name)
    if not os.path.exists(os.path.join(session.folder, SESSION_FILE)):
        raise SessionError(f"no chat session named {name!r} in {os.path.abspath(root)}")
    return session


def _exists(root, name):
    """SessionError for a missing session, checked before locking (the lock would create its folder)."""
    if not os.path.exists(os.path.join(session_folder(root, name), SESSION_FILE)):
        raise SessionError(f"no chat session named {name!r} in {os.path.abspath(root)}")


def reset_session(root: str, name: str, blocking: bool = True) -> ChatSession:
    """Drop every turn (the session keeps its name, folder and turn numbering)."""
    with session_lock(root, name, blocking):
        session = open_session(root, name)
        if not session.turns and session.revision == 0:
            return session
        return _commit(session, replace(session, turns=()))


def undo_turn(root: str, name: str, blocking: bool = True) -> ChatSession:
    """Remove the last turn."""
    _exists(root, name)
    with session_lock(root, name, blocking):
        session = _require(root, name)
        if not session.turns:
            raise SessionError(f"chat session {name!r} has no turn to undo")
        return _commit(session, replace(session, turns=session.turns[:-1]))


def fork_session(root: str, name: str, new_name: str, k: int) -> ChatSession:
    """New session `new_name` holding copies of the first k turns of `name` (0 <= k <= len(turns))."""
    if check_session_name(new_name) == check_session_name(name):
        raise SessionError(f"fork needs a new session name, got {new_name!r} twice")
    _exists(root, name)
    _check_fork(load_session(root, name), load_session(root, new_name), k)  # before locking creates any folder
    first, second = sorted((name, new_name))
    with session_lock(root, first), session_lock(root, second):
        src, dst = _require(root, name), open_session(root, new_name)
        _check_fork(src, dst, k)
        try:
            os.makedirs(os.path.join(dst.folder, "turns"), exist_ok=True)
            for t in src.turns[:k]:
                shutil.copytree(os.path.join(src.folder, "turns", f"{t.id:06d}"),
                                os.path.join(dst.folder, "turns", f"{t.id:06d}"))
        except BaseException:
            _after_failure(dst)
            raise
        return _commit(dst, replace(dst, turns=src.turns[:k], next_id=src.next_id, created=""))


def _check_fork(src: ChatSession, dst: ChatSession, k):
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(src.turns):
        raise SessionError(f"fork turn k must be an integer in 0..{len(src.turns)} (turns of {src.name!r}), got {k!r}")
    if dst.turns or os.path.exists(os.path.join(dst.folder, SESSION_FILE)):
        raise SessionError(f"session {dst.name!r} already exists; fork into a new name")


def commit_turn(session: ChatSession, record: TurnRecord, files: dict, follows: tuple | None = None) -> ChatSession:
    """Write a turn's files (staged, renamed into place), then session.json with the turn appended to `follows`
    (default: the session's turns; () after a reset, all but the last after an undo). Call under session_lock
    with the snapshot open_session read under that lock."""
    turns_dir = os.path.join(session.folder, "turns")
    tid = max(session.next_id, record.id)
    while os.path.exists(os.path.join(turns_dir, f"{tid:06d}")):  # a folder that could not be removed
        tid += 1
    record = _renumber(record, tid)
    try:
        os.makedirs(turns_dir, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".stage-", dir=turns_dir)
        for rel, data in files.items():
            with open(os.path.join(stage, rel.rsplit("/", 1)[-1]), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(stage, os.path.join(turns_dir, f"{tid:06d}"))
    except BaseException:
        _after_failure(session)
        raise
    turns = session.turns if follows is None else tuple(follows)
    return _commit(session, replace(session, turns=turns + (record,), next_id=tid + 1))


def _renumber(record: TurnRecord, tid: int) -> TurnRecord:
    def move(rel):
        return None if rel is None else f"turns/{tid:06d}/{rel.rsplit('/', 1)[-1]}"
    return replace(record, id=tid, user_images=tuple(move(r) for r in record.user_images), image=move(record.image),
                   mask=move(record.mask), features=move(record.features))


def turn_files(tid, message, instruction, images, mask, reply, image, blocks, settings, stats):
    """A TurnRecord for turn `tid` and {relative path: bytes} of its files."""
    folder = f"turns/{tid:06d}"
    files = {}
    user_images = []
    for i in range(0 if images is None else images.shape[0]):
        user_images.append(f"{folder}/user_{i}.png")
        files[user_images[-1]] = encode_image(images[i])
    mask_rel = None
    if mask is not None:
        mask_rel = f"{folder}/mask.png"
        files[mask_rel] = encode_image(mask.reshape(mask.shape[-2:]))
    files[f"{folder}/image.png"] = encode_image(image[0], {"message": message, "seed": settings["seed"]})
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
