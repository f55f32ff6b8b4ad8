// The built-in web chat: one page over raafd.js. Every text from an agent or a user is set with
// textContent (never innerHTML), so markup in a message is shown, not run.
import { RaafdClient, RaafdError } from "/static/raafd.js";

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const store = window.sessionStorage;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function randomId(prefix) {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const session = store.getItem("raafd.session") ?? randomId("web_");
store.setItem("raafd.session", session);

let client = null;
let current = null; // the stream of the reply in progress: {handle}
let room = null; // the joined RoomHandle

function setStatus(status, detail) {
  const banner = $("banner");
  if (status === "reconnecting") {
    banner.hidden = false;
    $("connection").textContent = "reconnecting…";
  } else if (status === "open") {
    banner.hidden = true;
    $("connection").textContent = detail?.user ? `connected as ${detail.user}` : "connected";
  } else if (status === "closed") {
    $("connection").textContent = "disconnected";
  } else {
    $("connection").textContent = "connecting…";
  }
}

function askForToken(why) {
  $("auth").hidden = false;
  $("connection").textContent = why;
  $("token").focus();
}

async function connect() {
  client?.close();
  client = new RaafdClient(window.location.origin, {
    token: store.getItem("raafd.token") ?? undefined,
    transport: "ws",
    onStatus: setStatus,
  });
  try {
    // The agent list first: a 401 here says auth is on and which token is missing or wrong,
    // before a WebSocket would wait for a hello that never comes.
    await loadAgents();
    await client.connect();
  } catch (error) {
    if (error instanceof RaafdError && error.code === "unauthorized") {
      client.close();
      askForToken(store.getItem("raafd.token") ? "that token was refused" : "a token is needed");
      return;
    }
    throw error;
  }
  $("auth").hidden = true;
  loadRooms();
}

async function loadAgents() {
  const select = /** @type {HTMLSelectElement} */ ($("agent"));
  const { agents } = await client.get("/v1/agents");
  select.replaceChildren(
    ...agents.map((agent) => {
      const option = el("option", "", agent.name);
      option.value = agent.name;
      option.selected = Boolean(agent.default);
      return option;
    }),
  );
}

async function loadRooms() {
  try {
    const { rooms } = await client.get("/v1/rooms");
    $("room-list").replaceChildren(...rooms.map((r) => Object.assign(el("option"), { value: r.room ?? r.name })));
  } catch {
    // no rooms endpoint or no permission: the join field still works
  }
}

/** A reply being streamed: text, badges and the status line, all set as text. */
function replyItem(who) {
  const item = el("li", "reply");
  item.append(el("span", "who", who));
  const text = el("span", "text");
  text.setAttribute("aria-live", "polite");
  text.setAttribute("aria-busy", "true");
  const badges = el("div", "badges");
  const meta = el("div", "meta");
  item.append(text, badges, meta);
  return { item, text, badges, meta };
}

/** Render one stream event into a reply; returns true at the terminal event. */
function render(reply, event, started) {
  switch (event.event) {
    case "content":
      reply.text.textContent += event.delta;
      return false;
    case "snapshot":
      reply.text.textContent = event.text;
      return false;
    case "tool_call":
      reply.badges.append(el("span", "badge tool-call", `tool call: ${event.tool_name}`));
      return false;
    case "tool_result":
      reply.badges.append(el("span", "badge tool-result", event.is_error ? "tool error" : "tool result"));
      return false;
    case "handoff":
      reply.badges.append(el("span", "badge handoff", `handoff: ${event.from_agent} → ${event.to_agent}`));
      return false;
    case "retry":
      reply.badges.append(el("span", "badge retry", `retry ${event.attempt}`));
      return false;
    case "complete": {
      const usage = event.usage ?? {};
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      const tokens = usage.completion_tokens ?? "?";
      reply.meta.append(el("span", "status status-complete", "complete"));
      reply.meta.append(el("span", "", ` · ${tokens} tokens · ${seconds} s`));
      return true;
    }
    case "error":
      reply.meta.append(el("span", "status status-error", `error: ${event.error?.message ?? event.error?.code}`));
      return true;
    case "cancelled":
      reply.meta.append(el("span", "status status-cancelled", `cancelled (${event.reason})`));
      return true;
    default:
      return false;
  }
}

async function send(text) {
  const log = $("log");
  const mine = el("li", "mine");
  mine.append(el("span", "who", "you"), el("span", "text", text));
  log.append(mine);
  const agent = /** @type {HTMLSelectElement} */ ($("agent")).value;
  const reply = replyItem(agent || "agent");
  log.append(reply.item);
  log.scrollTop = log.scrollHeight;
  $("stop").toggleAttribute("disabled", false);
  $("send").toggleAttribute("disabled", true);
  const started = performance.now();
  try {
    const handle = await client.start({ agent: agent || undefined, input: text, session });
    current = handle;
    reply.item.dataset.stream = handle.id;
    for await (const event of handle) {
      if (render(reply, event, started)) break;
      log.scrollTop = log.scrollHeight;
    }
  } catch (error) {
    reply.meta.append(el("span", "status status-error", `error: ${error.message}`));
  } finally {
    reply.text.setAttribute("aria-busy", "false");
    current = null;
    $("stop").toggleAttribute("disabled", true);
    $("send").toggleAttribute("disabled", false);
  }
}

// --- rooms ---------------------------------------------------------------------------------

function roomMessage(message) {
  const item = el("li", "room-message");
  item.dataset.id = String(message.id);
  item.append(el("span", "who", message.from), el("span", "text", message.text));
  $("room-log").append(item);
  $("room-log").scrollTop = $("room-log").scrollHeight;
}

function renderMembers(members) {
  $("members").replaceChildren(
    ...members.map((m) => {
      const member = typeof m === "string" ? { user: m, online: true } : m;
      const status = member.status ?? (member.online === false ? "offline" : "online");
      const item = el("li", "member");
      item.dataset.user = member.user;
      item.dataset.status = status;
      const dot = el("span", `dot ${status}`);
      dot.setAttribute("aria-hidden", "true");
      item.append(dot, el("span", "", `${member.user} (${status})`));
      return item;
    }),
  );
}

const typists = new Map(); // user → timer
function showTyping(user, state) {
  clearTimeout(typists.get(user));
  typists.delete(user);
  if (state === "start") typists.set(user, setTimeout(() => showTyping(user, "stop"), 6000));
  const names = [...typists.keys()];
  $("typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

async function joinRoom(name) {
  if (room) await room.leave().catch(() => {});
  room = await client.join(name);
  $("room").hidden = false;
  $("room-title").textContent = name;
  $("room-log").replaceChildren();
  room.history.forEach(roomMessage);
  const members = new Map(
    room.members.map((m) => (typeof m === "string" ? [m, { user: m, online: true }] : [m.user, m])),
  );
  renderMembers([...members.values()]);
  const replies = new Map(); // agent stream id → reply
  for await (const frame of room) {
    if (frame.type === "room.message") {
      if (frame.stream && replies.has(frame.stream)) replies.get(frame.stream).item.remove();
      roomMessage(frame);
    } else if (frame.type === "room.member") {
      if (frame.event === "leave") members.delete(frame.user);
      else members.set(frame.user, { ...members.get(frame.user), ...frame, online: frame.online ?? frame.status !== "offline" });
      renderMembers([...members.values()]);
    } else if (frame.type === "typing") {
      showTyping(frame.user, frame.state);
    } else if (frame.type === "room.reply" || frame.type === "stream.event") {
      let reply = replies.get(frame.stream);
      if (!reply) {
        reply = replyItem(frame.agent ? `agent:${frame.agent}` : "agent");
        reply.item.dataset.stream = frame.stream;
        reply.started = performance.now();
        replies.set(frame.stream, reply);
        $("room-log").append(reply.item);
      }
      if (frame.type === "stream.event" && render(reply, frame, reply.started)) {
        reply.text.setAttribute("aria-busy", "false");
      }
    }
  }
}

// --- wiring --------------------------------------------------------------------------------

$("compose").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = /** @type {HTMLTextAreaElement} */ ($("input"));
  const text = input.value.trim();
  if (!text || current) return;
  input.value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("compose").requestSubmit();
  }
});
$("stop").addEventListener("click", () => current?.cancel());
$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  store.setItem("raafd.token", /** @type {HTMLInputElement} */ ($("token")).value);
  connect();
});
$("room-join").addEventListener("submit", (event) => {
  event.preventDefault();
  joinRoom(/** @type {HTMLInputElement} */ ($("room-name")).value).catch((error) => {
    $("typing").textContent = `could not join: ${error.message}`;
  });
});
let typingSent = -Infinity; // when the last typing start was sent (performance.now())
$("room-input").addEventListener("input", () => {
  if (room && performance.now() - typingSent > 2000) {
    typingSent = performance.now();
    room.typing("start").catch(() => {});
  }
});
$("room-compose").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("room-input"));
  const text = input.value.trim();
  if (!room || !text) return;
  input.value = "";
  typingSent = -Infinity;
  room.typing("stop").catch(() => {});
  room.send(text).catch((error) => {
    $("typing").textContent = `not sent: ${error.message}`;
  });
});

connect();
