"""WeGen Chat Memory (session name -> WEGEN_CHAT) and WeGen Chat Turn (one turn of the chat: message +
images -> image + reply + updated chat), plus the /wegen/chat/* routes the chat panel (js/chat_panel.js)
reads. Sessions live in <ComfyUI output>/wegen/sessions/<name>/ (wegen.chat: JSON + PNG, atomic
writes, one lock per session). Chat memory and the decoder-side consistency options are extensions.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..wegen import rules
from . import convert, host

ACTIONS = ("continue", "reset", "undo last turn")
HISTORY_FEATURES = rules.HISTORY_FEATURES


def sessions_root() -> str:
    """<output directory>/wegen/sessions (ComfyUI's output folder; ./output without ComfyUI)."""
    return os.path.abspath(os.path.join(host.output_directory(), "wegen", "sessions"))


@dataclass(frozen=True)
class ChatRef:
    """What a WEGEN_CHAT link carries: a session and the turns it held when this value was made (immutable)."""

    root: str
    name: str
    turn_ids: tuple = ()
    revision: int = 0
    reset: bool = False  # the next Chat Turn drops the session's turns, committed with that turn
    undone: int | None = None  # undo: the id of the last turn, which the next Chat Turn drops (same commit)

    def __str__(self):
        return f"WeGen chat {self.name!r} ({len(self.turn_ids)} turns)"

    def expect_turns(self):
        """The turn ids the session must hold on disk when the next Chat Turn runs (None: any, for a reset)."""
        if self.reset:
            return None
        return self.turn_ids + (() if self.undone is None else (self.undone,))


def chat_in(chat) -> ChatRef:
    if not isinstance(chat, ChatRef):
        raise ValueError(f"chat must be a WEGEN_CHAT from WeGen Chat Memory or WeGen Chat Turn, got "
                         f"{type(chat).__name__}")
    return chat


def _ref(session) -> ChatRef:
    return ChatRef(session.root, session.name, session.turn_ids, session.revision)


class WeGenChatMemory:
    TITLE = "WeGen Chat Memory"
    CATEGORY = "WeGen/chat"
    DESCRIPTION = ("Extension (chat memory): opens a chat session kept on disk in <output>/wegen/sessions/<name>/ "
                   "(JSON + PNG; it survives restarts). Connect it to WeGen Chat Turn. Each run reads the session "
                   "as it is on disk (the node re-runs whenever the session changed). 'reset' makes the next Chat "
                   "Turn start the session over (the reset is saved with that turn, so a turn that fails keeps "
                   "the old ones); 'undo last turn' makes the next Chat Turn replace the latest turn (saved the "
                   "same way: a turn that fails keeps it).")
    RETURN_TYPES = ("WEGEN_CHAT",)
    RETURN_NAMES = ("chat",)
    OUTPUT_TOOLTIPS = ("The session's current turns, for WeGen Chat Turn.",)
    FUNCTION = "open"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session_name": ("STRING", {"default": "chat", "tooltip": "Extension: the session's folder name under "
                                        "<output>/wegen/sessions/ (letters, digits, _ . -)."}),
            "action": (list(ACTIONS), {"default": "continue", "tooltip": "Extension: continue = keep the turns; "
                                       "reset = the next Chat Turn starts the session over, on every run (saved "
                                       "with that turn: a failed turn keeps the old ones); undo last turn = the "
                                       "next Chat Turn replaces the latest turn, on every run (saved with that "
                                       "turn: a failed turn keeps it)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, session_name="chat", action="continue"):
        from ..wegen import sessions

        try:
            return f"{session_name}:{sessions.session_revision(sessions_root(), session_name)}:{action}"
        except ValueError:
            return float("nan")  # re-run: the node raises the clear error

    def open(self, session_name, action="continue"):
        from ..wegen import sessions

        root = sessions_root()
        sessions.check_session_name(session_name)
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {list(ACTIONS)}, got {action!r}")
        session = sessions.load_session(root, session_name)
        # reset and undo are applied by the next Chat Turn, in the same commit as its turn
        if action == "reset":
            return (ChatRef(session.root, session.name, (), session.revision, reset=True),)
        if action == "undo last turn":
            if not session.turns:
                raise sessions.SessionError(f"chat session {session_name!r} has no turn to undo")
            return (ChatRef(session.root, session.name, session.turn_ids[:-1], session.revision,
                            undone=session.turn_ids[-1]),)
        return (_ref(session),)


class WeGenChatTurn:
    TITLE = "WeGen Chat Turn"
    CATEGORY = "WeGen/chat"
    DESCRIPTION = ("Extension (chat memory): one turn of a chat. The prompt holds every earlier turn of the session "
                   "(SEED-X's multi-turn template; past images re-enter as image blocks from their stored "
                   "features) plus this message and its images; the turn is saved to the session only when it "
                   "succeeds. Consistency options (extension): strength < 1 starts the decoder from the previous "
                   "image; a mask (1 = change) keeps every pixel outside it exactly as in the previous image. "
                   "Chain several Chat Turns to refine step by step. The MLLM uses the checkpoint's recommended "
                   "feature slice; steps, cfg and size left at their defaults (0, -1, 0 x 0) use the checkpoint's "
                   "recommendation too (extension).")
    RETURN_TYPES = ("IMAGE", "STRING", "WEGEN_CHAT")
    RETURN_NAMES = ("image", "reply", "chat")
    OUTPUT_TOOLTIPS = ("The generated image, float (1, H, W, 3) in 0..1.",
                       "The model's reply text (empty when the image starts right away, the default).",
                       "The chat with this turn appended, for the next Chat Turn.")
    FUNCTION = "turn"
    OUTPUT_NODE = True  # saving the turn to the session is its job, even with nothing connected

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WEGEN_MODEL", {"tooltip": "From WeGen Loader."}),
                "chat": ("WEGEN_CHAT", {"tooltip": "From WeGen Chat Memory or the previous Chat Turn."}),
                "message": ("STRING", {"multiline": True, "default": "a red fox in a snowy forest, watercolor",
                                       "tooltip": "What you ask for in this turn."}),
                "seed": rules.widget("seed", "Seed of the decoder noise (and of text sampling) for this turn.",
                                     default=42),
                **rules.decode_widgets(),
                **rules.size_widgets(
                    f"Output width, {rules.SIZE_TIP} With strength < 1 or a mask it must equal the previous image's.",
                    f"Output height, {rules.SIZE_TIP} With strength < 1 or a mask it must equal the previous "
                    f"image's."),
                "strength": rules.widget("strength", "Extension (consistency strength): 1.0 = the decoder starts "
                                                     "from noise (release); lower starts from the previous image "
                                                     "and keeps more of it."),
                "feather": rules.widget("feather", "Extension: pixels over which the mask edge blends (with a "
                                                   "mask)."),
                "history_features": (list(HISTORY_FEATURES), {
                    "default": "stored",
                    "tooltip": "Extension: how past images re-enter the prompt: stored = their 64 generated "
                               "features (no re-encoding), eva = re-encoded from their PNG with EVA."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Images for this turn (each becomes an image block before the "
                                                "message)."}),
                "mask": ("MASK", {"tooltip": "Extension: 1 = change, 0 = keep the previous image's pixels exactly "
                                             "(the first input image's on a first turn)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def turn(self, model, chat, message, seed, steps, cfg, width, height, strength=1.0, feather=16,
             history_features="stored", images=None, mask=None, unique_id=None):
        chat = chat_in(chat)
        message = convert.text_in(message, "message")
        seed = convert.seeds(seed, 1)[0]
        images = None if images is None else convert.image_in(images, "images")
        if mask is not None:
            mask = convert.mask_in(mask, "mask")
            if mask.shape[0] != 1:
                raise ValueError(f"mask must hold one mask for the turn's one image, got a batch of {mask.shape[0]}")
        if history_features not in HISTORY_FEATURES:
            raise ValueError(f"history_features must be one of {list(HISTORY_FEATURES)}, got {history_features!r}")
        engine = host.load_engine(model)
        settings = convert.decode_settings(engine, steps, cfg, width, height)
        from ..wegen.chat import chat_turn

        result = chat_turn(
            engine, chat.root, chat.name, message, images, seed=seed, **settings, reference="auto", mask=mask,
            strength=strength, feather=feather, history_features=history_features,
            feature_slice=engine.recommended["feature_slice"], expect_turns=chat.expect_turns(), reset=chat.reset,
            undo=chat.undone is not None, stage=functools.partial(host.stage, model, engine))
        host.show_text(unique_id, result.reply)
        session = result.session
        shown = {"session": session.name, "revision": session.revision, "turns": len(session.turns)}
        return {"ui": {"wegen_chat": [shown]},
                "result": (convert.image_out(result.image), result.reply, _ref(session))}


NODE_CLASS_MAPPINGS = {"WeGenChatMemory": WeGenChatMemory, "WeGenChatTurn": WeGenChatTurn}


# Routes for the chat panel: /wegen/chat/* (plain functions, then thin aiohttp handlers) ----------------

def api_session(name: str) -> dict:
    """GET /wegen/chat/session?name=: the session's turns (texts, settings, image paths)."""
    from ..wegen import sessions

    return sessions.session_summary(sessions.load_session(sessions_root(), sessions.check_session_name(name)))


def api_image(name: str, file: str) -> str:
    """GET /wegen/chat/image?name=&file=: the path of an image the session lists (nothing else is served)."""
    from ..wegen import sessions

    return sessions.session_file(sessions_root(), sessions.check_session_name(name), file)


def api_undo(name: str) -> dict:
    """POST /wegen/chat/undo {name}: remove the last turn (refused while a turn runs)."""
    from ..wegen import sessions

    return sessions.session_summary(sessions.undo_turn(sessions_root(), name, blocking=False))


def api_new(name: str) -> dict:
    """POST /wegen/chat/new {name}: an unused session name based on `name` (nothing is created or removed)."""
    from ..wegen import sessions

    base = sessions.check_session_name(name).rstrip("0123456789").rstrip("-") or "chat"
    taken = set(sessions.list_sessions(sessions_root()))
    k = 2
    while f"{base}-{k}" in taken:
        k += 1
    return {"name": sessions.check_session_name(f"{base}-{k}")}


async def _handle(request, method: str):
    """One route: query (GET) or JSON body (POST) -> the api_* function; errors -> JSON {error} with a status."""
    from aiohttp import web

    from ..wegen import sessions

    try:
        args = dict(request.query) if request.method == "GET" else dict(await request.json())
        if method == "image":
            return web.FileResponse(api_image(str(args.get("name", "")), str(args.get("file", ""))))
        function = {"session": api_session, "undo": api_undo, "new": api_new}[method]
        return web.json_response(function(str(args.get("name", ""))))
    except sessions.CorruptSessionError as e:
        return web.json_response({"error": str(e)}, status=500)
    except (ValueError, TypeError) as e:
        status = 409 if "busy" in str(e) else (404 if method == "image" else 400)
        return web.json_response({"error": str(e)}, status=status)


def _handler(method: str):
    async def handler(request):
        return await _handle(request, method)
    return handler


def register_routes() -> list:
    """The chat panel's routes on ComfyUI's server (nothing without one); returns the paths registered."""
    added = []
    for method, verb in (("session", "GET"), ("image", "GET"), ("undo", "POST"), ("new", "POST")):
        path = f"/wegen/chat/{method}"
        if host.add_route(verb, path, _handler(method)):
            added.append(path)
    return added


try:
    register_routes()
except Exception as _e:  # a broken server must not hide the nodes
    host.log.warning("could not register the WeGen chat routes: %s", _e)
