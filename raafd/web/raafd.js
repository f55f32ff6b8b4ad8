// raafd.js — the browser client for raafd (an ES module; no build step, no dependencies).
//
// A client connects over WebSocket (subprotocol `raafd.v1`), authenticates with a `hello`
// frame (browsers cannot set headers on a WebSocket), and hands out streams and rooms as async
// iterators. When the connection drops it reconnects with exponential backoff and jitter and
// re-attaches every open stream from the last seq it delivered and rejoins every room after
// the last message id it delivered: each event reaches the caller exactly once across drops.
// Where WebSockets are blocked, `transport: "sse"` (or "auto" after failed attempts) follows
// streams with EventSource, which resumes with Last-Event-ID on its own.
//
// See docs/client-js.md for the whole API with examples.

/** @typedef {{stream: string, seq: number, event: string, [field: string]: any}} StreamEvent */
/** @typedef {{type: string, [field: string]: any}} Frame */

export const SUBPROTOCOL = "raafd.v1";
const TERMINAL = new Set(["complete", "error", "cancelled"]);
// Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes").
const FINAL_CLOSES = new Set([4401, 4403]);
const MAX_BUFFERED = 10000; // events held for a consumer that does not read (then: an error)

/** An error the server answered with (`code` is one of docs/protocol.md's error codes). */
export class RaafdError extends Error {
  /** @param {string} code @param {string} message @param {string} [field] @param {number} [retryAfter] */
  constructor(code, message, field, retryAfter) {
    super(message);
    this.name = "RaafdError";
    this.code = code;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

/**
 * A bounded FIFO read with `for await`: `push` from the connection, iteration by the caller.
 * @template T
 */
class Channel {
  constructor() {
    /** @type {T[]} */ this.items = [];
    /** @type {((r: IteratorResult<T>) => void) | null} */ this.waiter = null;
    /** @type {((e: any) => void) | null} */ this.failer = null;
    this.ended = false;
    /** @type {any} */ this.error = null;
  }
  /** @param {T} item */
  push(item) {
    if (this.ended) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = this.failer = null;
      w({ value: item, done: false });
    } else if (this.items.length >= MAX_BUFFERED) {
      this.fail(new RaafdError("too_large", "the caller stopped reading; events were not kept"));
    } else {
      this.items.push(item);
    }
  }
  end() {
    this.ended = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = this.failer = null;
      w({ value: undefined, done: true });
    }
  }
  /** @param {any} error */
  fail(error) {
    if (this.ended) return;
    this.error = error;
    this.ended = true;
    if (this.failer) {
      const f = this.failer;
      this.waiter = this.failer = null;
      f(error);
    }
  }
  /** @returns {Promise<IteratorResult<T>>} */
  next() {
    if (this.items.length) return Promise.resolve({ value: /** @type {T} */ (this.items.shift()), done: false });
    if (this.error) return Promise.reject(this.error);
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.waiter = resolve;
      this.failer = reject;
    });
  }
  [Symbol.asyncIterator]() {
    return this;
  }
}

function randomId(prefix) {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A stream as the caller sees it: `for await (const event of handle)` gives every event from
 * seq `after + 1` to the terminal one, exactly once across reconnects.
 */
export class StreamHandle {
  /** @param {RaafdClient} client @param {string} id @param {number} after */
  constructor(client, id, after) {
    this.client = client;
    this.id = id;
    this.lastSeq = after;
    this.done = false;
    /** @type {Channel<StreamEvent>} */ this.events = new Channel();
  }
  /** @param {StreamEvent} event */
  deliver(event) {
    if (this.done || event.seq <= this.lastSeq) return; // a replayed event already delivered
    this.lastSeq = event.seq;
    this.events.push(event);
    if (TERMINAL.has(event.event)) {
      this.done = true;
      this.events.end();
      this.client._forget(this);
    }
  }
  /** Ask the server to cancel the stream; its `cancelled` event still arrives here. */
  cancel() {
    return this.client.cancel(this.id);
  }
  [Symbol.asyncIterator]() {
    return this.events;
  }
}

/**
 * A joined room: `history` holds the messages `room.joined` answered with; iterate for every
 * later `room.message`, `room.member`, `typing` and agent `stream.event` of the room.
 */
export class RoomHandle {
  /** @param {RaafdClient} client @param {string} room @param {number | undefined} after */
  constructor(client, room, after) {
    this.client = client;
    this.room = room;
    this.lastId = after ?? null;
    /** @type {any[]} */ this.history = [];
    /** @type {string[] | any[]} */ this.members = [];
    /** @type {Channel<Frame>} */ this.events = new Channel();
    /** @type {Map<string, number>} */ this.replySeqs = new Map(); // agent reply stream → last seq
  }
  /** @param {Frame} frame */
  deliver(frame) {
    if (frame.type === "room.message") {
      if (this.lastId !== null && frame.id <= this.lastId) return; // already delivered
      this.lastId = frame.id;
      if (frame.stream) this.replySeqs.delete(frame.stream); // the reply is stored: done
    } else if (frame.type === "stream.event") {
      // An agent's reply in the room: a (re)join may replay it from seq 1; each event once.
      if (frame.seq <= (this.replySeqs.get(frame.stream) ?? 0)) return;
      if (this.replySeqs.size >= 64 && !this.replySeqs.has(frame.stream)) {
        this.replySeqs.delete(this.replySeqs.keys().next().value);
      }
      this.replySeqs.set(frame.stream, frame.seq);
    }
    this.events.push(frame);
  }
  /** @param {string} text @param {{clientId?: string, meta?: object}} [options] */
  send(text, options = {}) {
    return this.client.sendToRoom(this.room, text, options);
  }
  /** @param {"start" | "stop"} state */
  typing(state) {
    return this.client.command({ type: "typing", room: this.room, state }, { reply: false });
  }
  leave() {
    return this.client.leave(this.room);
  }
  [Symbol.asyncIterator]() {
    return this.events;
  }
}

/**
 * One connection to raafd, kept alive across drops.
 *
 * Options: `token` (sent in `hello`), `transport` ("ws", "sse" or "auto": WebSocket, falling
 * back to SSE after `fallbackAfter` failed connects), `backoff` {`initial`, `max`} in seconds,
 * `onStatus(status, detail)` with status "connecting" | "open" | "reconnecting" | "closed",
 * `onQueued(messages)` for offline messages (acked once the returned promise resolves).
 */
export class RaafdClient {
  /**
   * @param {string} [base] the server's http(s) origin, e.g. "http://127.0.0.1:8080" (default:
   *   the page's own origin)
   * @param {{token?: string, transport?: "ws" | "sse" | "auto", backoff?: {initial?: number, max?: number},
   *   fallbackAfter?: number, onStatus?: (status: string, detail?: any) => void,
   *   onQueued?: (messages: any[]) => any, WebSocket?: any, EventSource?: any}} [options]
   */
  constructor(base, options = {}) {
    this.base = (base ?? globalThis.location.origin).replace(/\/$/, "");
    this.token = options.token ?? null;
    this.transport = options.transport ?? "auto";
    this.initialBackoff = options.backoff?.initial ?? 0.25;
    this.maxBackoff = options.backoff?.max ?? 10;
    this.fallbackAfter = options.fallbackAfter ?? 3;
    this.onStatus = options.onStatus ?? (() => {});
    this.onQueued = options.onQueued ?? null;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.EventSource = options.EventSource ?? globalThis.EventSource;
    /** @type {WebSocket | null} */ this.ws = null;
    this.welcome = null;
    this.closed = false;
    this.attempt = 0;
    this.failedConnects = 0;
    this.refs = 0;
    /** @type {Map<string, {resolve: (f: Frame) => void, reject: (e: any) => void}>} */
    this.pending = new Map();
    /** @type {Map<string, StreamHandle>} */ this.streams = new Map();
    /** @type {Map<string, RoomHandle>} */ this.rooms = new Map();
    /** @type {Map<string, EventSource>} */ this.sources = new Map();
    /** @type {Promise<any> | null} */ this.ready = null;
    /** @type {((w: any) => void) | null} */ this.readyResolve = null;
  }

  /** Connect (once); resolves with the `welcome` frame. Rejects on a final refusal (4401/4403). */
  connect() {
    if (this.transport === "sse") return Promise.resolve(null);
    if (!this.ready) {
      this.ready = new Promise((resolve, reject) => {
        this.readyResolve = resolve;
        this.readyReject = reject;
      });
      this._open();
    }
    return this.ready;
  }

  /** Close for good: no reconnect; open iterators end. */
  close() {
    this.closed = true;
    for (const source of this.sources.values()) source.close();
    this.sources.clear();
    if (this.ws) this.ws.close(1000);
    for (const handle of this.streams.values()) handle.events.end();
    for (const room of this.rooms.values()) room.events.end();
    this.onStatus("closed");
  }

  _wsUrl() {
    return this.base.replace(/^http/, "ws") + "/v1/ws";
  }

  _open() {
    if (this.closed) return;
    this.onStatus(this.attempt ? "reconnecting" : "connecting", { attempt: this.attempt });
    const ws = new this.WebSocket(this._wsUrl(), SUBPROTOCOL);
    this.ws = ws;
    let welcomed = false;
    ws.onopen = () => {
      if (this.token) ws.send(JSON.stringify({ type: "hello", token: this.token, client: "raafd.js" }));
    };
    ws.onmessage = (message) => {
      /** @type {Frame} */ const frame = JSON.parse(message.data);
      if (frame.type === "welcome" && !welcomed) {
        welcomed = true;
        this.attempt = 0;
        this.failedConnects = 0;
        this.welcome = frame;
        this.onStatus("open", frame);
        this._resume();
        if (this.readyResolve) {
          this.readyResolve(frame);
          this.readyResolve = null;
        }
        return;
      }
      this._dispatch(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      for (const { reject } of this.pending.values()) {
        reject(new RaafdError("unavailable", "the connection closed before the answer"));
      }
      this.pending.clear();
      if (!welcomed) this.failedConnects += 1;
      if (this.closed) return;
      if (FINAL_CLOSES.has(event.code)) {
        const error = new RaafdError(event.code === 4401 ? "unauthorized" : "forbidden", event.reason || "refused");
        this.closed = true;
        this.onStatus("closed", { code: event.code, reason: event.reason });
        if (this.readyReject) this.readyReject(error);
        for (const handle of this.streams.values()) handle.events.fail(error);
        for (const room of this.rooms.values()) room.events.fail(error);
        return;
      }
      if (this.transport === "auto" && this.failedConnects >= this.fallbackAfter && !welcomed) {
        this.transport = "sse";
        this.onStatus("open", { transport: "sse" });
        if (this.readyResolve) this.readyResolve(null);
        for (const handle of [...this.streams.values()]) this._follow(handle);
        return;
      }
      this.attempt += 1;
      const ceiling = Math.min(this.maxBackoff, this.initialBackoff * 2 ** (this.attempt - 1));
      const delay = ceiling / 2 + Math.random() * (ceiling / 2); // "equal jitter"
      this.onStatus("reconnecting", { attempt: this.attempt, code: event.code, delay });
      setTimeout(() => this._open(), delay * 1000);
    };
  }

  /** After a (re)connect: every open stream from its last seq, every room after its last id. */
  _resume() {
    for (const handle of this.streams.values()) {
      this._send({ type: "stream.attach", stream: handle.id, after: handle.lastSeq }).catch(() => {});
    }
    for (const room of this.rooms.values()) {
      const join = { type: "room.join", room: room.room };
      if (room.lastId !== null) join.after = room.lastId;
      this.command(join).then((joined) => this._joined(room, joined, true)).catch((e) => room.events.fail(e));
    }
  }

  /** @param {Frame} frame */
  _dispatch(frame) {
    if (frame.ref && this.pending.has(frame.ref)) {
      const waiter = this.pending.get(frame.ref);
      this.pending.delete(frame.ref);
      if (frame.type === "error") {
        waiter?.reject(new RaafdError(frame.code, frame.message, frame.field, frame.retry_after));
      } else {
        waiter?.resolve(frame);
      }
      if (frame.type !== "stream.started" && frame.type !== "stream.attached") return;
    }
    switch (frame.type) {
      case "stream.event": {
        const handle = this.streams.get(frame.stream);
        if (handle) handle.deliver(frame);
        const room = frame.room && this.rooms.get(frame.room);
        if (room && !handle) room.deliver(frame);
        break;
      }
      case "room.message":
      case "room.member":
      case "room.reply":
      case "typing": {
        const room = this.rooms.get(frame.room);
        if (room) room.deliver(frame);
        break;
      }
      case "queued":
        this._queued(frame.messages ?? []);
        break;
      case "error":
        // An error about a stream with no ref: e.g. gone or not_found on a re-attach.
        if (frame.stream && this.streams.has(frame.stream)) {
          const handle = this.streams.get(frame.stream);
          handle?.events.fail(new RaafdError(frame.code, frame.message, frame.field));
          if (handle) this._forget(handle);
        }
        break;
      default:
        break;
    }
  }

  async _queued(messages) {
    if (!messages.length) return;
    if (this.onQueued) await this.onQueued(messages); // acked only once the handler is done
    this._send({ type: "ack", ids: messages.map((m) => m.id) }).catch(() => {});
  }

  /** @param {Frame} frame @returns {Promise<Frame>} */
  _send(frame, expectReply = true) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) {
      return Promise.reject(new RaafdError("unavailable", "not connected"));
    }
    if (!expectReply) {
      ws.send(JSON.stringify(frame));
      return Promise.resolve({ type: "sent" });
    }
    const ref = `r${++this.refs}`;
    const promise = new Promise((resolve, reject) => this.pending.set(ref, { resolve, reject }));
    ws.send(JSON.stringify({ ...frame, ref }));
    return /** @type {Promise<Frame>} */ (promise);
  }

  /**
   * Send any command and wait for its direct reply (or its error, as a RaafdError).
   * @param {Frame} frame @param {{reply?: boolean}} [options]
   */
  async command(frame, options = {}) {
    await this.connect();
    return this._send(frame, options.reply ?? true);
  }

  /**
   * Start a stream. `request`: `input` or `messages`, and optional `agent`, `session`, `stream`.
   * @returns {Promise<StreamHandle>}
   */
  async start(request) {
    const id = request.stream ?? randomId("js_");
    if (this.transport === "sse" || (await this.connect()) === null) {
      const body = await this._http("POST", "/v1/streams", { ...request, stream: id });
      return this._follow(new StreamHandle(this, body.stream, 0));
    }
    const handle = new StreamHandle(this, id, 0);
    this.streams.set(id, handle); // events may arrive in the same read as stream.started
    try {
      await this._send({ type: "stream.start", ...request, stream: id });
    } catch (error) {
      this.streams.delete(id);
      throw error;
    }
    return handle;
  }

  /** Follow an existing stream from seq `after` (0: from the start). */
  async attach(stream, after = 0) {
    if (this.transport === "sse" || (await this.connect()) === null) {
      return this._follow(new StreamHandle(this, stream, after));
    }
    const handle = new StreamHandle(this, stream, after);
    this.streams.set(stream, handle);
    try {
      await this._send({ type: "stream.attach", stream, after });
    } catch (error) {
      this.streams.delete(stream);
      throw error;
    }
    return handle;
  }

  /** Cancel a stream (its `cancelled` event reaches whoever follows it). */
  async cancel(stream) {
    if (this.transport === "sse" || !this.ws) {
      await this._http("POST", `/v1/streams/${encodeURIComponent(stream)}/cancel`);
      return;
    }
    await this._send({ type: "stream.cancel", stream });
  }

  /** @param {StreamHandle} handle */
  _forget(handle) {
    this.streams.delete(handle.id);
    const source = this.sources.get(handle.id);
    if (source) {
      source.close();
      this.sources.delete(handle.id);
    }
  }

  /** The SSE transport: EventSource resumes with Last-Event-ID by itself after a drop. */
  _follow(handle) {
    this.streams.set(handle.id, handle);
    const query = new URLSearchParams({ after: String(handle.lastSeq) });
    if (this.token) query.set("token", this.token);
    const url = `${this.base}/v1/streams/${encodeURIComponent(handle.id)}/events?${query}`;
    const source = new this.EventSource(url);
    this.sources.set(handle.id, source);
    const onEvent = (message) => handle.deliver(JSON.parse(message.data));
    for (const kind of ["start", "content", "tool_call", "tool_result", "handoff", "retry",
      "paused", "resumed", "complete", "error", "cancelled", "snapshot"]) {
      source.addEventListener(kind, onEvent);
    }
    source.onerror = () => this.onStatus(source.readyState === 2 ? "closed" : "reconnecting", { transport: "sse" });
    source.onopen = () => this.onStatus("open", { transport: "sse" });
    return handle;
  }

  /** A JSON HTTP request with the client's token; errors as RaafdError. */
  async _http(method, path, body) {
    const headers = { accept: "application/json" };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const response = await fetch(this.base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    const data = text ? JSON.parse(text) : {};
    if (!response.ok) {
      const e = data.error ?? {};
      throw new RaafdError(e.code ?? "internal", e.message ?? response.statusText, e.field, e.retry_after);
    }
    return data;
  }

  /** GET a JSON resource of the HTTP API (e.g. "/v1/agents"). */
  get(path) {
    return this._http("GET", path);
  }

  // --- rooms -------------------------------------------------------------------------------

  /**
   * Join a room: resolves with a RoomHandle whose `history` holds the messages the server
   * answered with (the last N, or exactly those after `after`). Rejoined after `lastId` on
   * every reconnect.
   * @param {string} room @param {{after?: number}} [options]
   */
  async join(room, options = {}) {
    const handle = new RoomHandle(this, room, options.after);
    const join = { type: "room.join", room };
    if (options.after !== undefined) join.after = options.after;
    this.rooms.set(room, handle);
    try {
      this._joined(handle, await this.command(join), false);
    } catch (error) {
      this.rooms.delete(room);
      throw error;
    }
    return handle;
  }

  /** @param {RoomHandle} handle @param {Frame} joined @param {boolean} again */
  _joined(handle, joined, again) {
    handle.members = joined.members ?? [];
    const messages = joined.messages ?? [];
    if (!again) handle.history = messages;
    for (const message of messages) {
      if (handle.lastId === null || message.id > handle.lastId) {
        if (again) handle.deliver({ type: "room.message", room: handle.room, ...message });
        else handle.lastId = message.id;
      }
    }
  }

  async leave(room) {
    const handle = this.rooms.get(room);
    this.rooms.delete(room);
    handle?.events.end();
    await this.command({ type: "room.leave", room });
  }

  /**
   * Send to a room; resolves with `room.sent` once the message is durable. The `client_id`
   * makes a resend after a drop idempotent: the same id comes back, no duplicate.
   */
  async sendToRoom(room, text, options = {}) {
    const clientId = options.clientId ?? randomId("m_");
    const frame = { type: "room.send", room, text, client_id: clientId };
    if (options.meta) frame.meta = options.meta;
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await this.command(frame);
      } catch (error) {
        if (!(error instanceof RaafdError) || error.code !== "unavailable" || attempt >= 5) throw error;
        await new Promise((r) => setTimeout(r, 250 * 2 ** attempt)); // resend after the reconnect
      }
    }
  }

  /** Set your presence: `status` ("online" | "away"), optional small `meta`. */
  setPresence(status, meta) {
    return this.command(meta ? { type: "presence.set", status, meta } : { type: "presence.set", status });
  }

  /** Presence of `users` (a list) or of a room's members (`{room}`). */
  getPresence(query) {
    return this.command({ type: "presence.get", ...query });
  }

  /** A direct message; resolves with `dm.sent` once it is durable. */
  dm(to, text, options = {}) {
    return this.command({ type: "dm.send", to, text, client_id: options.clientId ?? randomId("m_") });
  }
}
