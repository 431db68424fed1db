"""`python -m wegen queue`: batch-queue a ComfyUI workflow on running ComfyUI servers over HTTP (stdlib). EXTENSION.

`python -m wegen queue WORKFLOW.json --server URL [--server URL ...] [--set NODE.INPUT=v1,v2,...]`
spreads one workflow, expanded into jobs, over one or more ComfyUI machines, waits, downloads every
output, and resumes where it stopped. It speaks ComfyUI 0.8.0's HTTP API (shared/reference/
comfyui-host-contract.md, section 1.10) and never imports ComfyUI:
  POST /prompt {prompt, client_id} -> {prompt_id} (400 + node_errors when validation fails)
  GET /history/<id> -> {id: {outputs: {node: {images: [{filename, subfolder, type}], ...}}, status}}
  GET /queue -> {queue_running, queue_pending}   GET /view?filename&subfolder&type -> bytes
  GET /object_info -> node classes (input specs and input_order), needed to convert UI workflows.

Workflows: API format ({id: {class_type, inputs}}) is sent as is. UI format (what the editor saves) is converted
by wegen/workflow.py as the editor's "Export (API)" does, with the first server's /object_info as the node
definitions (Reroute, PrimitiveNode, muted and bypassed nodes as the frontend handles them; subgraphs are refused:
export those in API format). Seeds are sent as saved: "randomize" only acts in the editor.

--set NODE.INPUT=v1,v2,...: NODE is a node id, a title (_meta.title) or a class_type that is unique;
INPUT must be a widget input of that node. Values are cast to the type of the value already there
("\\," escapes a comma). Several --set options give their cartesian product (the last varies fastest).

Jobs go to the servers round-robin, at most `max_pending` queued on each at a time. Each finished job's
files land in OUT/job_NNNN/ with outputs.json; OUT/queue_state.json records every job by a hash of its
prompt, so a rerun skips finished jobs, keeps waiting for jobs still queued on their server, and
resubmits the rest. An unreachable server is a RemoteError (a ValueError: one line, exit code 2).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import re
import time
import uuid

from .files import write_json_atomic
from .queue_http import REQUEST_TIMEOUT, RemoteError, Server  # noqa: F401  (RemoteError: part of this API)
from .workflow import load_workflow, ui_to_api

log = logging.getLogger(__name__)

STATE = "queue_state.json"
FORMAT = "wegen-queue/1"


# HTTP: wegen/queue_http.py (one deadline per request, capped replies, every answer validated) ---------------


# --set and jobs ----------------------------------------------------------------------------------

def parse_set(text: str) -> tuple[str, str, list[str]]:
    """"NODE.INPUT=v1,v2" -> (NODE, INPUT, ["v1", "v2"]); "\\," keeps a comma inside a value."""
    left, eq, right = str(text).partition("=")
    node, dot, name = left.strip().rpartition(".")
    if not eq or not dot or not node or not name:
        raise ValueError(f"--set must look like NODE.INPUT=v1,v2,... (NODE: node id or title), got {text!r}")
    values = [v.replace("\0", ",") for v in right.replace("\\,", "\0").split(",")]
    if right.strip() == "" or any(v == "" for v in values):
        raise ValueError(f"--set {left}: give one or more comma-separated values, got {right!r}")
    return node.strip(), name.strip(), values


def find_node(api: dict, ref: str) -> str:
    """Node id for a --set NODE: an id, else a unique title, else a unique class_type."""
    if ref in api:
        return ref
    for field in ("title", "class_type"):
        ids = [i for i, n in api.items()
               if (n.get("_meta", {}).get("title") if field == "title" else n.get("class_type")) == ref]
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise ValueError(f"--set node {ref!r} is ambiguous: {field} of nodes {', '.join(ids)}; use the node id")
    known = ", ".join(f"{i} ({n.get('_meta', {}).get('title') or n.get('class_type')})" for i, n in api.items())
    raise ValueError(f"--set node {ref!r} is not in the workflow; nodes: {known}")


def cast_value(text: str, current, where: str):
    """A --set value as the type of the value it replaces."""
    try:
        if isinstance(current, bool):
            if text.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.strip().lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ValueError(f"--set {where}: {text!r} is not a valid {type(current).__name__} "
                         f"(the input holds {current!r})") from None
    return text


def expand_jobs(api: dict, sets: list[tuple[str, str, list[str]]]) -> list[tuple[dict, dict]]:
    """API prompt + parsed --set options -> [(overrides, prompt)], the cartesian product in order."""
    axes = []
    for ref, name, values in sets:
        nid = find_node(api, ref)
        inputs = api[nid].get("inputs", {})
        if name not in inputs:
            raise ValueError(f"--set {ref}.{name}: node {nid} ({api[nid]['class_type']}) has no input {name!r}; "
                             f"its inputs: {', '.join(inputs) or 'none'}")
        current = inputs[name]
        if isinstance(current, list) and len(current) == 2 and isinstance(current[0], str):
            raise ValueError(f"--set {ref}.{name}: that input is linked to node {current[0]}; --set only "
                             f"changes widget values")
        axes.append([(nid, name, f"{ref}.{name}", cast_value(v, current, f"{ref}.{name}")) for v in values])
    jobs = []
    for combo in itertools.product(*axes):
        prompt = copy.deepcopy(api)
        overrides = {}
        for nid, name, label, value in combo:
            prompt[nid]["inputs"][name] = value
            overrides[label] = value
        jobs.append((overrides, prompt))
    return jobs


def job_key(prompt: dict) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode("utf-8")).hexdigest()[:20]


# The queue ---------------------------------------------------------------------------------------

def check_queue_inputs(servers, max_pending, timeout, poll):
    if not servers:
        raise ValueError("give at least one --server URL (e.g. http://127.0.0.1:8188)")
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ValueError(f"max_pending (jobs queued per server at a time) must be >= 1, got {max_pending!r}")
    if not timeout > 0:
        raise ValueError(f"timeout (seconds per job) must be > 0, got {timeout!r}")
    if not poll > 0:
        raise ValueError(f"poll (seconds between checks) must be > 0, got {poll!r}")


def run_queue(workflow: str, servers: list[str], sets: list[str] = (), out_dir: str = os.path.join("output", "queue"),
              *, max_pending: int = 2, timeout: float = 3600.0, poll: float = 0.5, report=None) -> dict:
    """Queue every job of `workflow` x `sets` on `servers`, wait, download outputs; resumable. Extension.

    report(record) is called once per job as it finishes (or is skipped as already done).
    Returns {"jobs", "done", "skipped", "failed", "out", "errors"}.
    """
    # 1) check inputs, reach every server, build the jobs
    from .images import check_writable

    check_queue_inputs(servers, max_pending, timeout, poll)
    parsed = [parse_set(s) for s in sets]
    conns = [Server(u, timeout=min(REQUEST_TIMEOUT, timeout), download_timeout=timeout) for u in servers]
    wf, kind = load_workflow(workflow)
    for s in conns:
        s.ping()
    api = wf if kind == "api" else ui_to_api(wf, conns[0].object_info())
    jobs = expand_jobs(api, parsed)
    keys = [job_key(prompt) for _, prompt in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("--set repeats a value: two jobs would be the same prompt; give each value once")
    check_writable(out_dir, is_dir=True)
    state = _load_state(out_dir, workflow)
    report = report or _no_report

    # 2) sort jobs: finished (skip), still queued on their server (wait), the rest (submit)
    by_url = {s.url: s for s in conns}
    pending, in_flight, summary = [], [], {"jobs": len(jobs), "done": 0, "skipped": 0, "failed": 0,
                                           "out": out_dir, "errors": []}
    for index, (overrides, prompt) in enumerate(jobs):
        key = job_key(prompt)
        rec = state["jobs"].setdefault(key, {})
        rec.update(index=index, overrides=overrides)
        if rec.get("status") == "done" and all(os.path.isfile(os.path.join(out_dir, f)) for f in rec["files"]):
            summary["skipped"] += 1
            report({**rec, "skipped": True})
        elif rec.get("status") == "submitted" and _still_known(by_url.get(rec.get("server")), rec["prompt_id"]):
            rec["since"] = time.time()
            in_flight.append((key, prompt))
        else:
            rec.update(status="pending", server=None, prompt_id=None)
            pending.append((key, prompt))
    _save_state(out_dir, state)

    # 3) submit round-robin within max_pending per server, poll, download
    client_id = uuid.uuid4().hex
    turn = itertools.cycle(range(len(conns)))
    while pending or in_flight:
        pending = _submit_some(conns, turn, pending, in_flight, state, max_pending, client_id)
        _save_state(out_dir, state)
        still = []
        for key, prompt in in_flight:
            rec = state["jobs"][key]
            entry = by_url[rec["server"]].history(rec["prompt_id"])
            if entry is not None:
                _collect(by_url[rec["server"]], entry, rec, out_dir, summary)
                report(rec)
            elif time.time() - rec["since"] > timeout:
                msg = (f"job {rec['index']} still unfinished on {rec['server']} after {timeout:g} s; "
                       f"rerun to keep waiting")
                summary["failed"] += 1
                summary["errors"].append(msg)
                report({**rec, "error": msg})
            else:
                still.append((key, prompt))
        in_flight = still
        _save_state(out_dir, state)
        if in_flight:
            time.sleep(poll)
    return summary


def _no_report(record):
    return None


def _still_known(server, prompt_id) -> bool:
    """A job submitted by an earlier run that its server still holds (queued, running or finished)."""
    if server is None or not prompt_id:
        return False
    return prompt_id in server.queue_ids() or server.history(prompt_id) is not None


def _submit_some(conns, turn, pending, in_flight, state, max_pending, client_id):
    """Submit pending jobs to servers in round-robin order while they have room; returns what is left."""
    load = {s.url: 0 for s in conns}
    for key, _ in in_flight:
        load[state["jobs"][key]["server"]] = load.get(state["jobs"][key]["server"], 0) + 1
    pending = list(pending)
    while pending and any(load[s.url] < max_pending for s in conns):
        server = conns[next(turn)]
        if load[server.url] >= max_pending:
            continue
        key, prompt = pending.pop(0)
        rec = state["jobs"][key]
        rec.update(status="submitted", server=server.url, prompt_id=server.submit(prompt, client_id),
                   since=time.time())
        load[server.url] += 1
        in_flight.append((key, prompt))
    return pending


def _collect(server: Server, entry: dict, rec: dict, out_dir: str, summary: dict):
    """A finished history entry -> files in OUT/job_NNNN/, outputs.json, and the job's state."""
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or status.get("completed") is False:
        rec.update(status="failed", error=_execution_error(status))
        summary["failed"] += 1
        summary["errors"].append(f"job {rec['index']} failed on {server.url}: {rec['error']}")
        return
    folder = f"job_{rec['index']:04d}"
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    files, texts = [], {}
    for node_id, outputs in (entry.get("outputs") or {}).items():
        for key, values in outputs.items():
            for v in values if isinstance(values, list) else []:
                if isinstance(v, dict) and "filename" in v:
                    name = os.path.join(folder, _safe_name(f"{node_id}-{v['filename']}"))
                    server.view_to(v["filename"], v.get("subfolder", ""), v.get("type", "output"),
                                   os.path.join(out_dir, name))
                    files.append(name)
                elif not isinstance(v, dict):
                    texts.setdefault(node_id, {}).setdefault(key, []).append(v)
    with open(os.path.join(out_dir, folder, "outputs.json"), "w", encoding="utf-8") as f:
        json.dump({"overrides": rec["overrides"], "server": server.url, "prompt_id": rec["prompt_id"],
                   "files": files, "values": texts}, f, indent=1, ensure_ascii=False)
    rec.update(status="done", files=files, error=None)
    summary["done"] += 1


def _execution_error(status: dict) -> str:
    for msg in status.get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in ("execution_error", "execution_interrupted"):
            d = msg[1] if isinstance(msg[1], dict) else {}
            where = f"{msg[0]} in node {d.get('node_id')} ({d.get('node_type')})"
            return f"{where}: {d.get('exception_message', '')}".strip()
    return f"status {status.get('status_str')!r}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name)).lstrip(".") or "output"


def _load_state(out_dir: str, workflow: str) -> dict:
    path = os.path.join(out_dir, STATE)
    if not os.path.lexists(path):
        return {"format": FORMAT, "workflow": os.path.abspath(workflow), "jobs": {}}
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:  # a folder, unreadable, not UTF-8, not JSON
        raise ValueError(f"cannot read the queue state {path}: {getattr(e, 'strerror', None) or e}; move it away "
                         f"to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} queue state; use another --out")
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"the queue state {path} is corrupt ({problem}); move it away to start over")
    return state


def _state_problem(state: dict) -> str | None:
    """What is wrong with queue_state.json for the fields run_queue reads, or None."""
    jobs = state.get("jobs")
    if not isinstance(jobs, dict):
        return "'jobs' must be an object"
    for key, rec in jobs.items():
        if not isinstance(rec, dict):
            return f"job {key} must be an object"
        if rec.get("status", "pending") not in ("pending", "submitted", "done", "failed"):
            return f"job {key} has status {rec.get('status')!r}"
        if rec.get("status") == "done" and not (isinstance(rec.get("files"), list) and
                                                all(isinstance(f, str) for f in rec["files"])):
            return f"job {key}: files must be a list of paths"
        if rec.get("status") == "submitted" and not (isinstance(rec.get("server"), str) and
                                                     isinstance(rec.get("prompt_id"), str)):
            return f"job {key}: a submitted job needs server and prompt_id strings"
    return None


def _save_state(out_dir: str, state: dict):
    write_json_atomic(os.path.join(out_dir, STATE), state)
