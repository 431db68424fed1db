"""Atomic file writes (wegen.files)."""
import json
import os

import pytest

from wegen import files


def test_write_atomic_replaces_whole_file_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "state.json"
    files.write_json_atomic(str(path), {"a": 1, "text": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "text": "ü"}
    with pytest.raises(TypeError):
        files.write_atomic(str(path), "not bytes")  # fails inside the temp file's write
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "text": "ü"}  # the old file, whole
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temp file left behind
