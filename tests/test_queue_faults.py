"""`queue` against a misbehaving loopback server: trickles, endless bodies, odd JSON shapes, a corrupt state file.

The server is http.server in a thread on 127.0.0.1; every misbehaviour is a bounded loop that stops by itself
(or when the client hangs up), and the fixture shuts the server down. No wall-clock assertion: a trickle that
was cut off is seen from the server side (it could not send all it meant to).
"""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wegen import queueing

try:
    from wegen import queue_http
except ImportError:  # the client before bounds (to see these tests fail there)
    queue_http = None
from wegen.cli import main

API = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "q"}, "_meta": {"title": "Save"}}}
GOOD = {
    "/queue": {"queue_running": [], "queue_pending": []},
    "/prompt": {"prompt_id": "p1", "number": 1, "node_errors": {}},
    "/history/p1": {"p1": {"outputs": {"1": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
                           "status": {"status_str": "success", "completed": True, "messages": []}}},
    "/view": b"PNGDATA",
    "/object_info": {"SaveImage": {"input": {"required": {"filename_prefix": ["STRING", {}]}},
                                   "input_order": {"required": ["filename_prefix"]}, "output": []}},
}


class Misbehaving:
    """Answers GOOD unless `routes[path]` says otherwise: bytes/JSON, (status, JSON), or a callable(handler)."""

    def __init__(self, routes):
        self.routes = dict(GOOD, **routes)
        self.sent = {}  # path -> bytes a misbehaving route managed to send
        self.stop = threading.Event()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()


def _handler(server: Misbehaving):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            path = self.path.split("?")[0]
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
            route = server.routes.get(path, (404, {}))
            try:
                if callable(route):
                    return route(self, server, path)
                code, body = route if isinstance(route, tuple) else (200, route)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = _answer

    return Handler


def trickle(total=400, pause=0.02, headers_too=False):
    """One byte every `pause` s, `total` bytes (8 s at most): a slow drip that each read alone would accept."""
    def route(h, server, path):
        sent = 0
        try:
            if headers_too:
                for byte in b"HTTP/1.1 200 OK\r\n":
                    h.wfile.write(bytes([byte]))
                    h.wfile.flush()
                    sent += 1
                    time.sleep(pause)
                    if server.stop.is_set():
                        return
                h.wfile.write(b"Content-Length: %d\r\n\r\n" % total)
            else:
                h.send_response(200)
                h.send_header("Content-Length", str(total))
                h.end_headers()
            h.wfile.flush()
            for _ in range(total):
                if server.stop.is_set():
                    return
                h.wfile.write(b" ")
                h.wfile.flush()
                sent += 1
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            server.sent[path] = sent
    return route


def endless(chunk=b"x" * 65536, limit=1024):
    """A body with no length that does not end (until `limit` chunks, 64 MiB, or the client hangs up)."""
    def route(h, server, path):
        sent = 0
        try:
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            for _ in range(limit):
                if server.stop.is_set():
                    return
                h.wfile.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            server.sent[path] = sent
    return route


@pytest.fixture
def serve():
    made = []

    def start(**routes):
        made.append(Misbehaving(routes))
        return made[-1]
    yield start
    for s in made:
        s.close()


def _wf(tmp_path, api=API) -> str:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(api))
    return str(path)


def _run(tmp_path, server, **kw):
    return queueing.run_queue(_wf(tmp_path), [server.url], [], str(tmp_path / "out"),
                            **{"max_pending": 1, "timeout": 20.0, "poll": 0.01, **kw})


def test_the_well_behaved_stand_in_works(serve, tmp_path):
    summary = _run(tmp_path, serve())
    assert summary["done"] == 1
    assert (tmp_path / "out" / "job_0000" / "1-a.png").read_bytes() == b"PNGDATA"


# One deadline for the whole request ---------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, headers_too", [("/queue", False), ("/queue", True), ("/prompt", False),
                                                   ("/history/p1", False), ("/view", False)])
def test_a_trickling_server_is_cut_off_at_the_deadline(serve, tmp_path, endpoint, headers_too):
    server = serve(**{endpoint: trickle(headers_too=headers_too)})
    with pytest.raises(queueing.RemoteError, match=rf"{server.url} \((GET|POST) {endpoint}\) did not finish answering "
                                                 r"within 0\.5 s"):
        _run(tmp_path, server, timeout=0.5)
    for _ in range(200):  # the server notices the hang-up at its next write
        if endpoint in server.sent:
            break
        time.sleep(0.02)
    assert server.sent.get(endpoint, 0) < 390  # it could not drip the whole reply


def test_a_trickle_on_the_cli_is_one_line_exit_2(serve, tmp_path, capsys):
    server = serve(**{"/queue": trickle()})
    rc = main(["queue", _wf(tmp_path), "--server", server.url, "--timeout", "0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "did not finish answering within 0.5 s" in err


# Capped replies -------------------------------------------------------------------------------------------------

def test_an_endless_view_body_is_capped_and_leaves_no_file(serve, tmp_path, monkeypatch):
    if queue_http is not None:
        monkeypatch.setattr(queue_http, "MAX_DOWNLOAD_BYTES", 1 << 20)
    server = serve(**{"/view": endless()})
    with pytest.raises(queueing.RemoteError, match=rf"{server.url} \(GET /view\) sent more than 1048576 bytes"):
        _run(tmp_path, server)
    assert os.listdir(tmp_path / "out" / "job_0000") == []  # no partial file, no temp file


def test_an_announced_huge_view_is_refused_before_reading(serve, tmp_path):
    def huge(h, server, path):
        h.send_response(200)
        h.send_header("Content-Length", str(10**12))
        h.end_headers()
    server = serve(**{"/view": huge})
    with pytest.raises(queueing.RemoteError, match=r"announced a 1000000000000-byte reply"):
        _run(tmp_path, server)


@pytest.mark.parametrize("endpoint", ["/queue", "/history/p1", "/prompt"])
def test_an_endless_json_reply_is_capped(serve, tmp_path, monkeypatch, endpoint):
    if queue_http is not None:
        monkeypatch.setattr(queue_http, "MAX_JSON_BYTES", 1 << 20)
    server = serve(**{endpoint: endless()})
    with pytest.raises(queueing.RemoteError, match=rf"\((GET|POST) {endpoint}\) sent more than 1048576 bytes"):
        _run(tmp_path, server)


# Every reply validated ------------------------------------------------------------------------------------------

ODD = [
    ("/prompt", []), ("/prompt", "x"), ("/prompt", {}), ("/prompt", {"prompt_id": 5}), ("/prompt", {"prompt_id": ""}),
    ("/prompt", b"\xff\xfe not utf-8"), ("/prompt", b"<html>not json</html>"),
    ("/queue", []), ("/queue", {"queue_running": "x"}), ("/queue", {"queue_pending": [[0]]}),
    ("/queue", {"queue_pending": [5]}), ("/queue", None),
    ("/history/p1", []), ("/history/p1", {"p1": []}), ("/history/p1", {"p1": {"outputs": []}}),
    ("/history/p1", {"p1": {"outputs": {"1": []}}}),
    ("/history/p1", {"p1": {"outputs": {"1": {"images": [{"filename": 5}]}}}}),
    ("/history/p1", {"p1": {"outputs": {"1": {"images": [{"filename": "a.png", "subfolder": None}]}}}}),
    ("/history/p1", {"p1": {"outputs": {}, "status": "done"}}),
    ("/history/p1", {"p1": {"outputs": {}, "status": {"messages": "x"}}}),
]


@pytest.mark.parametrize("endpoint, answer", ODD, ids=[f"{e}-{a!r}"[:40] for e, a in ODD])
def test_odd_json_shapes_are_one_line_naming_server_and_endpoint(serve, tmp_path, capsys, endpoint, answer):
    server = serve(**{endpoint: answer})
    rc = main(["queue", _wf(tmp_path), "--server", server.url, "--poll", "0.01", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert server.url in err and endpoint in err, err


@pytest.mark.parametrize("answer", [[], {"SaveImage": 5}, "x"])
def test_odd_object_info_for_a_ui_workflow(serve, tmp_path, answer):
    ui = {"nodes": [{"id": 1, "type": "SaveImage", "widgets_values": ["q"]}], "links": []}
    server = serve(**{"/object_info": answer})
    with pytest.raises(queueing.RemoteError, match=rf"{server.url} \(GET /object_info\) answered"):
        queueing.run_queue(_wf(tmp_path, ui), [server.url], [], str(tmp_path / "out"), poll=0.01)


@pytest.mark.parametrize("body", [{"error": "x", "node_errors": []}, {"error": {}, "node_errors": {"1": 5}},
                                  {"error": {"message": "bad"}, "node_errors": {"1": {"errors": [5, "x"]}}},
                                  {"error": ["a\nb"]}, b"\xff"])
def test_odd_http_error_bodies_are_one_line(serve, tmp_path, body):
    server = serve(**{"/prompt": (400, body)})
    with pytest.raises(queueing.RemoteError, match=rf"{server.url} (refused|answered) POST /prompt") as err:
        _run(tmp_path, server)
    assert "\n" not in str(err.value)


def test_execution_error_with_an_odd_message_is_reported(serve, tmp_path):
    entry = {"p1": {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                              "messages": [["execution_error", "boom"], 5]}}}
    summary = _run(tmp_path, serve(**{"/history/p1": entry}))
    assert summary["failed"] == 1 and "execution_error" in summary["errors"][0]


# A corrupt queue_state.json -------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"[]", b'{"format": "wegen-queue/1", "jobs": []}', b'{"format": "wegen-queue/1", "jobs": {"k": 5}}',
    b'{"format": "wegen-queue/1", "jobs": {"k": {"status": "done", "files": "x"}}}',
    b'{"format": "wegen-queue/1", "jobs": {"k": {"status": "submitted", "server": 1, "prompt_id": null}}}',
    b'{"format": "wegen-queue/1", "jobs": {"k": {"status": "weird"}}}', b"\xff\xfe{", b"{trunc", "folder",
])
def test_corrupt_queue_state_is_one_line_and_left_alone(serve, tmp_path, capsys, content):
    server = serve()
    out = tmp_path / "out"
    out.mkdir()
    state = out / queueing.STATE
    if content == "folder":
        state.mkdir()
    else:
        state.write_bytes(content)
    rc = main(["queue", _wf(tmp_path), "--server", server.url, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(state) in err, err
    if content != "folder":
        assert state.read_bytes() == content
