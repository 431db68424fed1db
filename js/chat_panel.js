// WeGen chat panel (extension): shows the chat session on every "WeGen Chat Turn" node (each turn's
// message, input images, reply and picture) with "new session" and "undo" buttons. Data comes from the
// pack's routes /wegen/chat/{session,image,undo,new} (nodes/chat.py), which serve only that session's
// files. The workflow runs the same without this file: it only decorates our own node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TURN_NODE = "WeGenChatTurn";
const MEMORY_NODE = "WeGenChatMemory";
const STYLE = `
.wegen-chat-panel{display:flex;flex-direction:column;gap:4px;font:12px sans-serif;color:var(--input-text,#ddd);
  background:var(--comfy-input-bg,#222);border-radius:6px;padding:6px;box-sizing:border-box;overflow:hidden}
.wegen-chat-bar{display:flex;gap:4px;align-items:center}
.wegen-chat-bar .wegen-chat-title{flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;opacity:.8}
.wegen-chat-bar button{font:11px sans-serif;padding:2px 6px;cursor:pointer}
.wegen-chat-turns{overflow-y:auto;flex:1;display:flex;flex-direction:column;gap:6px}
.wegen-chat-turn{border-top:1px solid #444;padding-top:4px}
.wegen-chat-turn img{max-width:72px;max-height:72px;margin:2px;border:1px solid #555;image-rendering:pixelated}
.wegen-chat-user{font-weight:bold}.wegen-chat-reply{opacity:.85}.wegen-chat-error{color:#f88}`;

function addStyle() {
  if (document.getElementById("wegen-chat-style")) return;
  const style = document.createElement("style");
  style.id = "wegen-chat-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

// The WeGen Chat Memory node a Chat Turn reads from (through earlier Chat Turns), or null.
function memoryNode(node, seen = new Set()) {
  if (!node || seen.has(node.id)) return null;
  seen.add(node.id);
  if (node.comfyClass === MEMORY_NODE || node.type === MEMORY_NODE) return node;
  const slot = node.inputs?.findIndex((i) => i.name === "chat") ?? -1;
  return slot < 0 ? null : memoryNode(node.getInputNode(slot), seen);
}

function sessionOf(node) {
  const memory = memoryNode(node);
  return memory?.widgets?.find((w) => w.name === "session_name")?.value ?? null;
}

function imageUrl(name, file) {
  return api.apiURL(`/wegen/chat/image?name=${encodeURIComponent(name)}&file=${encodeURIComponent(file)}`);
}

function thumb(name, file, title) {
  const img = el("img");
  img.src = imageUrl(name, file);
  img.title = title;
  img.loading = "lazy";
  return img;
}

function render(panel, data) {
  panel.title.textContent = `session: ${data.name} (${data.turns.length} turn${data.turns.length === 1 ? "" : "s"})`;
  panel.list.replaceChildren();
  if (!data.turns.length) panel.list.appendChild(el("div", "wegen-chat-empty", "No turns yet: queue the workflow."));
  data.turns.forEach((turn, i) => {
    const row = el("div", "wegen-chat-turn");
    row.dataset.turnId = String(turn.id);
    row.appendChild(el("div", "wegen-chat-user", `${i + 1}. You: ${turn.user}`));
    for (const file of turn.user_images) row.appendChild(thumb(data.name, file, "your image"));
    if (turn.mask) row.appendChild(thumb(data.name, turn.mask, "edit mask"));
    row.appendChild(el("div", "wegen-chat-reply", `WeGen: ${turn.reply || "(image)"}`));
    row.appendChild(thumb(data.name, turn.image, `seed ${turn.settings.seed}`));
    panel.list.appendChild(row);
  });
  panel.list.scrollTop = panel.list.scrollHeight;
}

function showError(panel, text) {
  panel.list.replaceChildren(el("div", "wegen-chat-error", text));
}

async function call(route, options) {
  const res = await api.fetchApi(route, options);
  const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (!res.ok) throw new Error(data.error || `${res.status} ${res.statusText}`);
  return data;
}

function post(route, body) {
  return call(route, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function refresh(node, name) {
  const panel = node.wegenChat;
  if (!panel) return;
  name = name || sessionOf(node);
  panel.name = name;
  if (!name) {
    panel.title.textContent = "no session";
    showError(panel, "Connect a WeGen Chat Memory (directly or through earlier Chat Turns).");
    return;
  }
  try {
    render(panel, await call(`/wegen/chat/session?name=${encodeURIComponent(name)}`));
  } catch (e) {
    showError(panel, String(e.message || e));
  }
}

function refreshAll(name) {
  for (const node of app.graph?._nodes ?? []) {
    if (node.wegenChat && (!name || sessionOf(node) === name || node.wegenChat.name === name)) refresh(node);
  }
}

async function undo(node) {
  const name = sessionOf(node);
  if (!name) return refresh(node);
  try {
    await post("/wegen/chat/undo", { name });
    refreshAll(name);
  } catch (e) {
    showError(node.wegenChat, String(e.message || e));
  }
}

// "new session": point the Chat Memory node at a fresh, unused name (the old session stays on disk).
async function newSession(node) {
  const memory = memoryNode(node);
  const widget = memory?.widgets?.find((w) => w.name === "session_name");
  if (!widget) return refresh(node);
  try {
    const { name } = await post("/wegen/chat/new", { name: widget.value || "chat" });
    widget.value = name;
    widget.callback?.(name);
    app.graph.setDirtyCanvas(true, true);
    refreshAll();
  } catch (e) {
    showError(node.wegenChat, String(e.message || e));
  }
}

function buildPanel(node) {
  addStyle();
  const root = el("div", "wegen-chat-panel");
  const bar = el("div", "wegen-chat-bar");
  const title = el("span", "wegen-chat-title", "session");
  const newButton = el("button", "wegen-chat-new", "new session");
  const undoButton = el("button", "wegen-chat-undo", "undo");
  newButton.title = "Start a new session: the Chat Memory node gets an unused name; the old session is kept.";
  undoButton.title = "Remove the session's last turn.";
  newButton.onclick = () => newSession(node);
  undoButton.onclick = () => undo(node);
  bar.append(title, newButton, undoButton);
  const list = el("div", "wegen-chat-turns");
  root.append(bar, list);
  const widget = node.addDOMWidget("chat_panel", "wegen_chat_panel", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 180, getMaxHeight: () => 600,
  });
  widget.serialize = false; // not part of widgets_values: saved workflows keep their widget order
  node.wegenChat = { root, title, list, name: null };
  node.setSize([Math.max(node.size[0], 380), Math.max(node.size[1], 620)]);
}

app.registerExtension({
  name: "wegen.chat_panel",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TURN_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      buildPanel(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const shown = message?.wegen_chat?.[0];
      if (shown) refreshAll(shown.session);
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      if (this.graph) setTimeout(() => refresh(this), 0);
      return result;
    };
  },
  nodeCreated(node) {
    if (node.comfyClass !== MEMORY_NODE) return;
    const widget = node.widgets?.find((w) => w.name === "session_name");
    if (!widget) return;
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      refreshAll();
      return result;
    };
  },
  async afterConfigureGraph() {
    refreshAll();
  },
});
