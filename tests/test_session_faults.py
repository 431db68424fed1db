"""Sessions that cannot be lost: an interrupt or a kill at every filesystem call of turn, reset + turn, undo +
turn, reset, undo and fork leaves a session that loads, in the old state or the new one, and the next open removes
what the killed writer left. Also: reset and undo commit with their turn, leftovers are cleaned, a stopped lock
holder is reported after a bounded wait, session names with control characters are refused, a session file that
is a folder is a clear error.

The model is stubbed in the sweeps (the filesystem protocol is what is tested; test_chat.py runs the model)."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import faults
import pytest
import torch

from wegen import chat, files, locking, sessions
from wegen.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(steps=1, width=64, height=64, prefix_cache=None)
FS_MODULES = (sessions, files, locking)


@pytest.fixture(scope="module")
def template(engine, tmp_path_factory):
    """A session 'fox' with three turns (made with the model, steps 1)."""
    root = str(tmp_path_factory.mktemp("faults"))
    for i, m in enumerate(("a red fox", "pink sky", "a full moon")):
        chat.chat_turn(engine, root, "fox", m, seed=i, **FAST)
    return root


@pytest.fixture
def stub_model(engine, monkeypatch):
    """chat_turn without the model's compute: fixed features and a fixed image (fs calls unchanged)."""
    g = torch.Generator().manual_seed(0)
    features, image = torch.randn(1, 64, 112, generator=g), torch.rand(1, 64, 64, 3, generator=g)
    monkeypatch.setattr(chat, "_encode", lambda *a, **k: (features, "", {"prompt_tokens": 1, "reused_tokens": 0}))
    monkeypatch.setattr(engine, "decode_pixels", lambda *a, **k: image.clone())
    return engine


def fresh(template, tmp_path):
    root = str(tmp_path / "s")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    return root


def state(root, name):
    """(turn ids, user texts) of a session that must load, every turn's files readable and checksummed."""
    s = sessions.load_session(root, name)
    for t in s.turns:
        s.features(t)
        s.image(t)
    return s.turn_ids, tuple(t.user for t in s.turns)


def leftovers(root, name):
    folder = os.path.join(root, name)
    turns = os.path.join(folder, "turns")
    listed = {f"{i:06d}" for i in sessions.load_session(root, name).turn_ids}
    extra = [e for e in os.listdir(folder) if e.startswith(".tmp-")]
    extra += [e for e in (os.listdir(turns) if os.path.isdir(turns) else []) if e not in listed]
    return extra


def reopen(root, name):
    with sessions.session_lock(root, name):
        sessions.open_session(root, name)


OLD = ((1, 2, 3), ("a red fox", "pink sky", "a full moon"))


def _ops(engine):
    """op -> (run(root), the session it changes, its state before, its state after)."""
    return {
        "turn": (lambda r: chat.chat_turn(engine, r, "fox", "one more", seed=5, **FAST),
                 "fox", OLD, ((1, 2, 3, 4), OLD[1] + ("one more",))),
        "reset+turn": (lambda r: chat.chat_turn(engine, r, "fox", "start over", seed=5, reset=True, **FAST),
                       "fox", OLD, ((4,), ("start over",))),
        "undo+turn": (lambda r: chat.chat_turn(engine, r, "fox", "a new moon", seed=5, undo=True, **FAST),
                      "fox", OLD, ((1, 2, 4), OLD[1][:2] + ("a new moon",))),
        "reset": (lambda r: sessions.reset_session(r, "fox"), "fox", OLD, ((), ())),
        "undo": (lambda r: sessions.undo_turn(r, "fox"), "fox", OLD, ((1, 2), OLD[1][:2])),
        "fork": (lambda r: sessions.fork_session(r, "fox", "fox-b", 2), "fox-b", ((), ()), ((1, 2), OLD[1][:2])),
    }


@pytest.mark.parametrize("op", ["turn", "reset+turn", "undo+turn", "reset", "undo", "fork"])
def test_fault_at_every_fs_call_leaves_old_or_new_state(stub_model, template, tmp_path, op, fast_fsync):
    run_op, name, old, new = _ops(stub_model)[op]
    allowed = {old, new}
    root = fresh(template, tmp_path)

    def run():
        run_op(root)

    def check(k, mode, f):
        where = f"{op}, {mode} at fs call {k} ({f.failed})"
        assert state(root, name) in allowed, where
        assert state(root, "fox") in (allowed if name == "fox" else {OLD}), where
        reopen(root, name)  # the next open (under the lock) removes what the killed writer left
        assert leftovers(root, name) == [], where
        assert state(root, name) in allowed, where
        fresh(template, tmp_path)

    tried = faults.sweep(run, FS_MODULES, check)
    print(f"\nfault injection, {op}: {tried} faulted runs (interrupt + kill), each left the old or new state")
    assert tried >= 8
    assert state(root, name) == new and leftovers(root, name) == []  # the last run, with no fault, committed


def test_interrupt_between_replace_and_directory_fsync_keeps_the_new_turn(stub_model, template, tmp_path,
                                                                          monkeypatch):
    """The bricked-session window: session.json replaced, then Ctrl+C while the folder is fsynced."""
    real_fsync, real_replace = os.fsync, os.replace
    for op in ("turn", "undo+turn", "fork"):
        root = fresh(template, tmp_path)
        run_op, name, old, new = _ops(stub_model)[op]
        replaced = []

        def replace(src, dst):
            real_replace(src, dst)
            replaced.append(os.path.basename(dst) == sessions.SESSION_FILE)

        def fsync(fd):
            if any(replaced) and _is_dir_fd(fd):
                raise KeyboardInterrupt("Ctrl+C during the directory fsync")
            return real_fsync(fd)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(KeyboardInterrupt):
            run_op(root)
        monkeypatch.setattr(os, "fsync", real_fsync)
        monkeypatch.setattr(os, "replace", real_replace)
        assert state(root, name) == new  # committed, and it loads


def _is_dir_fd(fd):
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)


# reset commits with its turn -----------------------------------------------------------------------

@pytest.mark.parametrize("extra,code", [
    (["--strength", "0.5"], 2),
    (["--reference", "previous"], 2),
    (["--mask", "MASK32"], 2),
    (["--mask", "MASK64"], 2),  # a mask needs a reference: after a reset there is no previous image
    ([], 130),  # Ctrl+C during the turn
])
def test_cli_reset_with_a_failing_turn_keeps_the_session(stub_model, template, tmp_path, capsys, tiny_ckpt,
                                                        monkeypatch, extra, code):
    from wegen.engine import WeGenEngine
    from wegen.images import save_png

    root = fresh(template, tmp_path)
    for side in (32, 64):
        save_png(torch.ones(side, side, 3), str(tmp_path / f"m{side}.png"))
    extra = [str(tmp_path / f"m{e[-2:]}.png") if e.startswith("MASK") else e for e in extra]
    monkeypatch.setattr(WeGenEngine, "load", classmethod(lambda cls, *a, **k: stub_model))
    if code == 130:
        monkeypatch.setattr(stub_model, "decode_pixels", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    before = sessions.load_session(root, "fox")
    rc = main(["chat", "--checkpoint", tiny_ckpt, "--session", "fox", "--sessions-dir", root, "--steps", "1",
               "--size", "64", "--reset", "again", "--out", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr()[1]
    assert rc == code and err.startswith("error: ") and err.count("\n") == 1, err
    after = sessions.load_session(root, "fox")
    assert after == before and state(root, "fox") == OLD


def test_reset_and_turn_commit_once(stub_model, template, tmp_path):
    root = fresh(template, tmp_path)
    rev = sessions.load_session(root, "fox").revision
    res = chat.chat_turn(stub_model, root, "fox", "start over", seed=1, reset=True, **FAST)
    assert res.session.turn_ids == (4,) and res.session.revision == rev + 1
    assert res.record.instruction.endswith("start over") and res.record.settings["reference"] == "none"
    assert sorted(os.listdir(os.path.join(root, "fox", "turns"))) == ["000004"]
    assert sessions.load_session(root, "fox") == res.session


# undo commits with its turn -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error", [
    (dict(reference="previous", strength=0.5, width=32, height=32), ValueError),  # wrong size, found under the lock
    (dict(expect_turns=(1, 2)), sessions.SessionError),  # a stale chat state
    (dict(reset=True), ValueError),  # both: refused before the lock
    (dict(), KeyboardInterrupt),  # Ctrl+C during the turn
])
def test_undo_with_a_failing_turn_keeps_the_session(stub_model, template, tmp_path, monkeypatch, kwargs, error):
    root = fresh(template, tmp_path)
    if error is KeyboardInterrupt:
        monkeypatch.setattr(stub_model, "decode_pixels", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    before = sessions.load_session(root, "fox")
    with pytest.raises(error):
        chat.chat_turn(stub_model, root, "fox", "a new moon", seed=1, undo=True, **{**FAST, **kwargs})
    assert sessions.load_session(root, "fox") == before and state(root, "fox") == OLD
    assert leftovers(root, "fox") == []


def test_undo_and_turn_commit_once(stub_model, template, tmp_path):
    root = fresh(template, tmp_path)
    rev = sessions.load_session(root, "fox").revision
    res = chat.chat_turn(stub_model, root, "fox", "a new moon", seed=1, undo=True, strength=0.5, **FAST)
    assert res.session.turn_ids == (1, 2, 4) and res.session.revision == rev + 1
    assert res.record.settings["reference"] == "previous"  # turn 2's image: the turn sees the session without 3
    assert sorted(os.listdir(os.path.join(root, "fox", "turns"))) == ["000001", "000002", "000004"]
    assert sessions.load_session(root, "fox") == res.session
    empty = str(tmp_path / "e")
    with pytest.raises(sessions.SessionError, match="has no turn to undo"):
        chat.chat_turn(stub_model, empty, "new", "hi", seed=1, undo=True, **FAST)
    assert sessions.load_session(empty, "new").turns == ()


# leftovers of killed writers -------------------------------------------------------------------------

def test_leftovers_of_killed_writers_are_removed_on_the_next_open(stub_model, template, tmp_path):
    root = fresh(template, tmp_path)
    folder = os.path.join(root, "fox")
    for d in ("turns/.stage-abc123", "turns/000007", "turns/000042/x"):
        os.makedirs(os.path.join(folder, d))
    for f in (".tmp-k1l2m3", "turns/.stage-abc123/image.png", "turns/000007/image.png"):
        open(os.path.join(folder, f), "wb").close()
    keep = os.path.join(folder, "turns", "notes")  # not ours: left alone
    os.makedirs(keep)
    res = chat.chat_turn(stub_model, root, "fox", "one more", seed=5, **FAST)
    assert res.session.turn_ids[:3] == (1, 2, 3)
    assert sorted(os.listdir(os.path.join(folder, "turns"))) == ["000001", "000002", "000003",
                                                                 f"{res.record.id:06d}", "notes"]
    assert not [e for e in os.listdir(folder) if e.startswith(".tmp-")]
    fork_dst = os.path.join(root, "fox-b", "turns", "000001")  # a fork killed before its session.json
    os.makedirs(fork_dst)
    sessions.fork_session(root, "fox", "fox-b", 1)
    assert sessions.load_session(root, "fox-b").turn_ids == (1,)


# a stopped lock holder -------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from wegen import locking  # the lock alone: no torch to import
    with locking.folder_lock({folder!r}, "test holder"):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_stopped_lock_holder_is_reported_after_a_bounded_wait(template, tmp_path, monkeypatch):
    root = fresh(template, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, folder=os.path.join(root, "fox"))],
                            stdout=subprocess.PIPE, text=True)
    outcome = []
    try:
        assert proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGSTOP)
        monkeypatch.setenv("WEGEN_LOCK_WAIT", "0.3")

        def undo():
            try:
                sessions.undo_turn(root, "fox")
                outcome.append("done")
            except sessions.SessionError as e:
                outcome.append(str(e))

        worker = threading.Thread(target=undo, daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the turn waited for the stopped holder without a bound"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    (message,) = outcome
    assert "chat session 'fox' is busy" in message and f"process {proc.pid}" in message
    assert "(stopped)" in message and "0.3 s" in message and "\n" not in message
    assert state(root, "fox") == OLD


def test_lock_wait_setting_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("WEGEN_LOCK_WAIT", "soon")
    with pytest.raises(ValueError, match="WEGEN_LOCK_WAIT must be a finite number"):
        sessions.reset_session(str(tmp_path), "x")
    monkeypatch.setenv("WEGEN_LOCK_WAIT", "nan")
    with pytest.raises(ValueError, match="WEGEN_LOCK_WAIT"):
        locking.lock_wait()


def test_busy_in_this_process_names_the_pid(template, tmp_path, session_held):
    root = fresh(template, tmp_path)
    with session_held(root, "fox"):
        with pytest.raises(sessions.SessionError, match=rf"busy: another thread of this process \(pid {os.getpid()}\)"):
            sessions.undo_turn(root, "fox", blocking=False)


# a session file that is a folder ---------------------------------------------------------------------

def test_session_file_that_is_a_folder_is_a_clear_error(stub_model, tmp_path):
    path = tmp_path / "dir" / sessions.SESSION_FILE
    path.mkdir(parents=True)
    changes = (lambda: sessions.load_session(str(tmp_path), "dir"),
               lambda: sessions.undo_turn(str(tmp_path), "dir"),
               lambda: sessions.reset_session(str(tmp_path), "dir"),
               lambda: sessions.fork_session(str(tmp_path), "dir", "dir-b", 0),
               lambda: chat.chat_turn(stub_model, str(tmp_path), "dir", "hi", seed=1, **FAST))
    for change in changes:
        with pytest.raises(sessions.CorruptSessionError, match="is a folder; it must be a file") as info:
            change()
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.is_dir() and sorted(os.listdir(path.parent)) in (["session.json"], [".lock", "session.json"])


# names --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fox\n", "fox\r\n", "fo\tx", "fox\x00", "fox\x1b[2J", "fox\u2028", "fox\x7f"])
def test_session_names_with_control_characters_are_refused(tmp_path, name, capsys, tiny_ckpt):
    with pytest.raises(sessions.SessionError, match="letters, digits, '_', '.', '-'.*control characters"):
        sessions.check_session_name(name)
    rc = main(["chat", "--checkpoint", tiny_ckpt, "--session", name, "--sessions-dir", str(tmp_path), "hi",
               "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr()[1]
    assert rc == 2 and "session name must be" in err
    assert os.listdir(tmp_path) == []
