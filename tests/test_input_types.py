"""Every node's INPUT_TYPES against a snapshot (tests/data/input_types.json): saved workflows are positional,
so names, order, types, defaults, bounds and tooltips must not move. The Loader's checkpoint list depends on
the machine and is replaced by a placeholder. After an intended change (a new optional widget at the end),
regenerate with `python tests/test_input_types.py --write` and review the diff."""
from __future__ import annotations

import json
import os
import sys

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "input_types.json")
CHECKPOINTS = "<checkpoint folders>"


def snapshot() -> dict:
    """{node id: INPUT_TYPES()} as JSON values (tuples -> lists), in registration and declaration order."""
    from host_stubs import load_pack

    NODE_CLASS_MAPPINGS = load_pack().nodes.NODE_CLASS_MAPPINGS

    out = {}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        spec = json.loads(json.dumps(cls.INPUT_TYPES()))
        if node_id == "WeGenLoader":
            spec["required"]["checkpoint"][0] = CHECKPOINTS
            spec["required"]["checkpoint"][1].pop("default", None)  # present only when wegen-toy is listed
        out[node_id] = spec
    return out


def _pairs(value):
    """Dicts -> [key, value] lists, recursively, so comparing also compares key order."""
    if isinstance(value, dict):
        return [[k, _pairs(v)] for k, v in value.items()]
    if isinstance(value, list):
        return [_pairs(v) for v in value]
    return value


def test_input_types_unchanged():
    with open(FIXTURE, encoding="utf-8") as f:
        expected = json.load(f)
    got = snapshot()
    assert list(got) == list(expected), "node ids or their order changed"
    for node_id in expected:
        assert _pairs(got[node_id]) == _pairs(expected[node_id]), f"{node_id}.INPUT_TYPES changed"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(FIXTURE, "w", encoding="utf-8") as f:
        json.dump(snapshot(), f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(FIXTURE)
