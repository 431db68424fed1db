"""ComfyUI-WeGen nodes: thin adapters over wegen.engine, one file per concern.

Each node file exports NODE_CLASS_MAPPINGS; registering a file = adding it to _NODE_FILES. Nothing
heavy is imported here (torch and the engine load on first use).
"""
from . import chat, decode, encode, loader, understand
from . import sweep as _sweep

_NODE_FILES = (loader, encode, decode, understand, chat)
_NODE_FILES += (_sweep,)  # Prompt Self-Rewrite, Diversity Sweep (extensions)

NODE_CLASS_MAPPINGS: dict = {}
for _file in _NODE_FILES:
    _clash = NODE_CLASS_MAPPINGS.keys() & _file.NODE_CLASS_MAPPINGS.keys()
    assert not _clash, f"node ids registered twice: {sorted(_clash)}"
    NODE_CLASS_MAPPINGS.update(_file.NODE_CLASS_MAPPINGS)

NODE_DISPLAY_NAME_MAPPINGS = {node_id: cls.TITLE for node_id, cls in NODE_CLASS_MAPPINGS.items()}
