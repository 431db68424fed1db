"""Session names and folders (wegen/sessions.py): nothing escapes the sessions folder. Turns, resume and
nothing-lost are in tests/test_chat.py and tests/test_session_faults.py."""
import os

import pytest

from wegen import sessions


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "a..b", "con", "NUL.txt",
                                  "x" * 65, "sp ace", None, 3])
def test_session_names_cannot_escape(tmp_path, name):
    with pytest.raises(sessions.SessionError, match="session name"):
        sessions.session_folder(str(tmp_path), name)
    assert os.listdir(tmp_path) == []


def test_symlinked_session_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "sessions"
    root.mkdir()
    os.symlink(outside, root / "evil")
    with pytest.raises(sessions.SessionError, match="outside the sessions folder"):
        sessions.load_session(str(root), "evil")
    assert sessions.session_folder(str(root), "ok-name_1.v2").endswith("ok-name_1.v2")
