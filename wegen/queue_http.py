"""The queue's HTTP client (stdlib only): bounded requests, capped replies, validated answers. EXTENSION.

A server is not trusted: every request has ONE deadline for the whole exchange (connect, headers and
body; a server trickling a byte every few seconds is cut off when it passes, not after each read), a
JSON reply larger than MAX_JSON_BYTES and a download larger than MAX_DOWNLOAD_BYTES are refused (a
download streams to a temp file, never into memory, and is renamed into place only when complete),
and every answer of /prompt, /queue, /history and /object_info is checked for the shape the queue reads.
Each failure is a RemoteError (a ValueError): one line naming the server and the endpoint.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import tempfile
import threading
import urllib.parse

REQUEST_TIMEOUT = 30.0  # seconds for one API request, at most (the job --timeout when smaller)
MAX_JSON_BYTES = 64 << 20
MAX_DOWNLOAD_BYTES = 2 << 30
CHUNK = 1 << 16


class RemoteError(ValueError):
    """A server could not be reached, refused a request, or sent something unexpected."""


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class Server:
    """One ComfyUI server's HTTP API. `timeout`: the deadline of one API request; `download_timeout`: of a /view."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT, download_timeout: float | None = None):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"--server must be an http(s) URL such as http://127.0.0.1:8188, got {url!r}")
        self.scheme, self.netloc, self.base = parsed.scheme, parsed.netloc, parsed.path.rstrip("/")
        self.url = f"{parsed.scheme}://{parsed.netloc}{self.base}"
        self.timeout = timeout
        self.download_timeout = download_timeout or timeout
        self._object_info = None

    # One exchange under one deadline -------------------------------------------------------------

    def _exchange(self, method: str, path: str, params=None, body=None, sink=None, cap: int | None = None,
                  timeout: float | None = None) -> bytes:
        """The reply body (or written to `sink`), the whole exchange within `timeout` seconds, at most `cap` bytes."""
        timeout, cap = timeout or self.timeout, cap or MAX_JSON_BYTES
        where = f"{self.url} ({method} {path})"
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.netloc, timeout=timeout)
        expired, resp, sockets = threading.Event(), None, []

        def cut_off():  # the deadline: shut the socket, so any read in progress returns at once
            expired.set()
            for sock in sockets:  # kept here: a closing connection hands its socket to the response
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(timeout, cut_off)
        timer.daemon = True
        timer.start()
        try:
            conn.connect()
            sockets.append(conn.sock)
            if expired.is_set():
                raise OSError("cut off")
            data = None if body is None else json.dumps(body).encode("utf-8")
            target = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
            conn.request(method, target, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            if resp.status >= 400:
                raise _http_error(self.url, method, path, resp.status, resp.reason, _read(resp, 1 << 20, None, where))
            length = resp.getheader("Content-Length") or ""
            if length.isdigit() and int(length) > cap:
                raise RemoteError(f"{where} announced a {length}-byte reply, more than the {cap} bytes queue reads")
            out = _read(resp, cap, sink, where)
            if expired.is_set():
                raise OSError("cut off")
            return out
        except RemoteError:
            raise
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise RemoteError(f"{where} did not finish answering within {timeout:g} s; is the server "
                                  f"overloaded or misbehaving?") from None
            raise RemoteError(f"cannot reach ComfyUI at {self.url} ({method} {path}): {getattr(e, 'reason', e)}; "
                              f"is the server running, and listening on that address?") from None
        finally:
            timer.cancel()
            if resp is not None:
                resp.close()  # the socket closes only when the response lets go of it too
            conn.close()

    def get_json(self, path: str, params=None, method: str = "GET", body=None):
        raw = self._exchange(method, path, params, body)
        try:
            return json.loads(raw)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            raise RemoteError(f"{self.url} ({method} {path}) did not answer JSON; is this a ComfyUI server?") from None

    def _bad(self, method: str, path: str, answer, expected: str) -> RemoteError:
        return RemoteError(f"{self.url} ({method} {path}) answered {_short(answer)}; expected {expected}")

    # The endpoints queue uses, each answer checked -----------------------------------------------

    def ping(self):
        self.queue_ids()

    def object_info(self) -> dict:
        if self._object_info is None:
            info = self.get_json("/object_info")
            if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
                raise self._bad("GET", "/object_info", info, "an object of node classes, each an object")
            self._object_info = info
        return self._object_info

    def submit(self, prompt: dict, client_id: str) -> str:
        answer = self.get_json("/prompt", method="POST", body={"prompt": prompt, "client_id": client_id})
        if not isinstance(answer, dict) or not isinstance(answer.get("prompt_id"), str) or not answer["prompt_id"]:
            raise self._bad("POST", "/prompt", answer, "an object with a prompt_id string")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The finished entry of prompt_id, or None while it is queued or running (or unknown)."""
        path = f"/history/{urllib.parse.quote(prompt_id)}"
        answer = self.get_json(path)
        if not isinstance(answer, dict):
            raise self._bad("GET", path, answer, "an object keyed by prompt id")
        entry = answer.get(prompt_id)
        if entry is not None:
            problem = _entry_problem(entry)
            if problem:
                raise self._bad("GET", path, entry, problem)
        return entry

    def queue_ids(self) -> set:
        q = self.get_json("/queue")
        ok = isinstance(q, dict) and all(
            isinstance(q.get(k, []), list) and all(isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)
                                                   for item in q.get(k, []))
            for k in ("queue_running", "queue_pending"))
        if not ok:
            raise self._bad("GET", "/queue", q, "{queue_running: [...], queue_pending: [...]} with "
                                                "[number, prompt_id, ...] items")
        return {item[1] for k in ("queue_running", "queue_pending") for item in q.get(k, [])}

    def view_to(self, filename: str, subfolder: str, kind: str, path: str) -> str:
        """Download an output file to `path`: streamed, capped, renamed into place only when complete."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                self._exchange("GET", "/view", {"filename": filename, "subfolder": subfolder, "type": kind}, sink=f,
                               cap=MAX_DOWNLOAD_BYTES, timeout=self.download_timeout)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path


def _read(resp, cap: int, sink, where: str) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = resp.read(CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > cap:
            raise RemoteError(f"{where} sent more than {cap} bytes; refused (no ComfyUI reply is that large)")
        if sink is None:
            chunks.append(chunk)
        else:
            sink.write(chunk)


def _entry_problem(entry) -> str | None:
    """What is wrong with a /history entry for the parts queue reads, or None."""
    if not isinstance(entry, dict):
        return "an object with outputs and status"
    outputs, status = entry.get("outputs", {}), entry.get("status", {})
    if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
        return "outputs: an object of node id -> {name: [values]}"
    for node in outputs.values():
        for values in node.values():
            for v in values if isinstance(values, list) else []:
                if isinstance(v, dict) and "filename" in v and not (
                        isinstance(v["filename"], str) and v["filename"] and
                        all(isinstance(v.get(k, ""), str) for k in ("subfolder", "type"))):
                    return "file outputs as {filename, subfolder, type} strings"
    if status is not None and not isinstance(status, dict):
        return "status: an object"
    if isinstance(status, dict) and not isinstance(status.get("messages") or [], list):
        return "status.messages: a list"
    return None


def _http_error(url, method, path, code, reason, raw: bytes) -> RemoteError:
    try:
        detail = json.loads(raw or b"{}")
    except ValueError:
        detail = {}
    if isinstance(detail, dict) and "error" in detail:
        err = detail["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        node_errors = detail.get("node_errors")
        nodes = [f"node {nid} ({v.get('class_type')}): " +
                 "; ".join(f"{x.get('message', '')} {x.get('details', '')}" for x in v.get("errors") or []
                           if isinstance(x, dict))
                 for nid, v in (node_errors.items() if isinstance(node_errors, dict) else ()) if isinstance(v, dict)]
        return RemoteError(f"{url} refused {method} {path} (HTTP {code}): {_one_line(msg)}" +
                           (f" [{_one_line(' | '.join(nodes))}]" if nodes else ""))
    return RemoteError(f"{url} answered {method} {path} with HTTP {code} {_one_line(reason)}")


def _one_line(value) -> str:
    return " ".join(str(value).split())[:500]
