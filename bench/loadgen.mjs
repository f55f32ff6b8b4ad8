// Load generator for bench/stream_bench.py: raw sockets, no client library, one core.
//
//   node bench/loadgen.mjs stream --transport ws|sse|openai|vercel|direct --port P --n N
//        [--host 127.0.0.1] [--ramp MS] [--duration MS] [--deltas 64] [--stall 200]
//        [--model assistant]
//   node bench/loadgen.mjs idle --port P --n N [--sources K] [--concurrency C] [--hold S]
//   node bench/loadgen.mjs room --port P --n N --rooms R --rate M --duration MS [--token T]
//        [--publishers P] [--window W] [--concurrency C] [--sources K]
//
// stream: N virtual clients, each with its own connection, each running one stream at a time
// back to back (a closed loop) until --duration has passed; a stream started before that runs to
// its end. Client i sends its first request at i * ramp / N, so with --ramp about one stream's
// length the starts are spread evenly and N streams run at once in steady state.
//   ws      GET /v1/ws (subprotocol raafd.v1), then {"type":"stream.start"} per stream
//   sse     POST /v1/streams with Accept: text/event-stream, on a keep-alive connection
//   openai  POST /v1/chat/completions to raafd ("model": --model, the agent), stream:true
//   vercel  POST /v1/ui/chat (the Vercel AI SDK's UI message stream), a new chat id (session)
//           per stream
//   direct  POST /v1/chat/completions straight to the fake upstream (the baseline)
// openai and direct read `data: {chat.completion.chunk}` lines (choices[0].delta.content) up
// to `data: [DONE]`; vercel reads `text-delta` chunks up to `data: [DONE]`; ws and sse read
// raafd's `content` events.
// Every content delta carries "<index>@<upstream send ms>|" (bench/fake_upstream.mjs); on
// receipt the generator records one-way latency (receipt - send), inter-token gaps per stream
// (a delivery carrying several tokens counts its later ones as gap 0), time to first token (first content receipt - request write), missing, duplicated and
// out-of-order indexes, and how each stream ended. It prints one JSON object and exits.
//
// idle: opens N WebSocket connections (source addresses 127.0.0.1..127.0.0.K, at most C
// handshakes in flight), waits for each `welcome`, prints {"event":"ready",...}, holds them until
// a line on stdin, stdin's end, or --hold seconds, closes them, prints {"event":"closed",...}.
//
// room: N member connections spread over R rooms (room-0 … room-R-1, created by the caller),
// each joins its room; then --publishers connections per room (default 4: a connection's
// commands are answered in order, so one connection has one room.send being stored at a time)
// send M messages a second to it together (at most W room.send unanswered each), for
// --duration ms. Each message's text carries the
// publisher's send time; every member records one-way latency on receipt. Prints one JSON
// object: messages sent and acknowledged, deliveries, their rate, latency, and how many member
// connections the server closed (4001) or whose ids had gaps.
//
// Every mode ends by itself: a hard deadline bounds each run.

import net from 'node:net';
import crypto from 'node:crypto';
import readline from 'node:readline';
import fs from 'node:fs';

const [mode, ...rest] = process.argv.slice(2);
const opt = {};
for (let i = 0; i < rest.length; i++) {
  if (rest[i].startsWith('--')) opt[rest[i].slice(2)] = rest[i + 1];
}
const HOST = opt.host ?? '127.0.0.1';
const PORT = Number(opt.port);
const N = Number(opt.n ?? 1);

const nowMs = () => Number(process.hrtime.bigint()) / 1e6; // CLOCK_MONOTONIC, shared

function cpuMs() {
  const u = process.cpuUsage();
  return Math.round((u.user + u.system) / 1000);
}

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// --- WebSocket framing (client side: frames we send are masked) ------------------------------

const MASK = crypto.randomBytes(4);

function wsFrame(opcode, payload) {
  const len = payload.length;
  let header;
  if (len < 126) {
    header = Buffer.allocUnsafe(6);
    header[1] = 0x80 | len;
    MASK.copy(header, 2);
  } else if (len < 65536) {
    header = Buffer.allocUnsafe(8);
    header[1] = 0x80 | 126;
    header.writeUInt16BE(len, 2);
    MASK.copy(header, 4);
  } else {
    header = Buffer.allocUnsafe(14);
    header[1] = 0x80 | 127;
    header.writeBigUInt64BE(BigInt(len), 2);
    MASK.copy(header, 10);
  }
  header[0] = 0x80 | opcode;
  const body = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) body[i] = payload[i] ^ MASK[i & 3];
  return Buffer.concat([header, body]);
}

const wsText = (s) => wsFrame(0x1, Buffer.from(s));

function wsHandshake(host, port) {
  const key = crypto.randomBytes(16).toString('base64');
  return (
    `GET /v1/ws HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\n` +
    `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
    `Sec-WebSocket-Protocol: raafd.v1\r\n\r\n`
  );
}

// Parses server frames (unmasked) from a byte stream; calls onMessage(opcode, Buffer).
class WsParser {
  constructor(onMessage) {
    this.buf = null;
    this.onMessage = onMessage;
    this.fragments = null;
    this.fragOpcode = 0;
  }
  feed(data) {
    let buf = this.buf ? Buffer.concat([this.buf, data]) : data;
    let at = 0;
    const end = buf.length;
    while (end - at >= 2) {
      const b0 = buf[at];
      const b1 = buf[at + 1];
      let len = b1 & 0x7f;
      let hdr = 2;
      if (len === 126) {
        if (end - at < 4) break;
        len = buf.readUInt16BE(at + 2);
        hdr = 4;
      } else if (len === 127) {
        if (end - at < 10) break;
        len = Number(buf.readBigUInt64BE(at + 2));
        hdr = 10;
      }
      if (b1 & 0x80) hdr += 4; // a masked server frame is a protocol error; tolerate it
      if (end - at < hdr + len) break;
      const payload = buf.subarray(at + hdr, at + hdr + len);
      at += hdr + len;
      const fin = b0 & 0x80;
      const opcode = b0 & 0x0f;
      if (opcode === 0) {
        this.fragments.push(Buffer.from(payload));
        if (fin) {
          const whole = Buffer.concat(this.fragments);
          this.fragments = null;
          this.onMessage(this.fragOpcode, whole);
        }
      } else if (!fin && opcode < 8) {
        this.fragments = [Buffer.from(payload)];
        this.fragOpcode = opcode;
      } else {
        this.onMessage(opcode, payload);
      }
    }
    this.buf = at < end ? Buffer.from(buf.subarray(at)) : null;
  }
}

// --- HTTP/1.1 response with an event-stream body ---------------------------------------------

// Parses responses from a keep-alive connection: head, then a chunked or sized body whose
// text is split into SSE `data:` lines. Calls onHead(status), onData(line), onEnd().
class HttpSseParser {
  constructor(onHead, onData, onEnd) {
    this.onHead = onHead;
    this.onData = onData;
    this.onEnd = onEnd;
    this.reset();
  }
  reset() {
    this.state = 'head';
    this.buf = null;
    this.text = '';
    this.remaining = 0;
    this.chunked = false;
  }
  feed(data) {
    let buf = this.buf ? Buffer.concat([this.buf, data]) : data;
    this.buf = null;
    let at = 0;
    for (;;) {
      if (this.state === 'head') {
        const idx = buf.indexOf('\r\n\r\n', at);
        if (idx < 0) break;
        const head = buf.toString('latin1', at, idx).toLowerCase();
        at = idx + 4;
        const status = Number(head.slice(9, 12));
        this.chunked = /\r\ntransfer-encoding:\s*chunked/.test(head);
        const m = /\r\ncontent-length:\s*(\d+)/.exec(head);
        this.remaining = m ? Number(m[1]) : 0;
        this.closeAfter = /\r\nconnection:\s*close/.test(head);
        this.onHead(status);
        if (this.chunked) this.state = 'size';
        else if (this.remaining > 0) this.state = 'sized';
        else {
          this.finish();
          continue;
        }
      } else if (this.state === 'size') {
        const idx = buf.indexOf('\r\n', at);
        if (idx < 0) break;
        const size = parseInt(buf.toString('latin1', at, idx), 16);
        at = idx + 2;
        if (size === 0) this.state = 'trailer';
        else {
          this.remaining = size;
          this.state = 'chunk';
        }
      } else if (this.state === 'chunk' || this.state === 'sized') {
        if (at >= buf.length) break;
        const take = Math.min(this.remaining, buf.length - at);
        this.body(buf.toString('utf8', at, at + take));
        at += take;
        this.remaining -= take;
        if (this.remaining > 0) break;
        if (this.state === 'sized') {
          this.finish();
          continue;
        }
        this.state = 'chunk-crlf';
      } else if (this.state === 'chunk-crlf') {
        if (buf.length - at < 2) break;
        at += 2;
        this.state = 'size';
      } else if (this.state === 'trailer') {
        const idx = buf.indexOf('\r\n', at);
        if (idx < 0) break;
        const empty = idx === at;
        at = idx + 2;
        if (empty) this.finish();
      } else break;
    }
    if (at < buf.length) this.buf = Buffer.from(buf.subarray(at));
  }
  body(s) {
    let text = this.text + s;
    let start = 0;
    for (;;) {
      const nl = text.indexOf('\n', start);
      if (nl < 0) break;
      if (text.startsWith('data:', start)) {
        const from = text.charCodeAt(start + 5) === 32 ? start + 6 : start + 5;
        this.onData(text.slice(from, nl));
      }
      start = nl + 1;
    }
    this.text = start < text.length ? text.slice(start) : '';
  }
  finish() {
    const closeAfter = this.closeAfter;
    this.state = 'head';
    this.text = '';
    this.onEnd(closeAfter);
  }
}

// --- percentiles ------------------------------------------------------------------------------

function summary(values) {
  const n = values.length;
  if (!n) return { n: 0 };
  const a = Float64Array.from(values).sort();
  const q = (p) => a[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))];
  let sum = 0;
  for (const v of a) sum += v;
  const r = (v) => Math.round(v * 1000) / 1000;
  return { n, p50: r(q(0.5)), p90: r(q(0.9)), p99: r(q(0.99)), max: r(a[n - 1]), mean: r(sum / n) };
}

// --- stream mode ------------------------------------------------------------------------------

function streamMode() {
  const transport = opt.transport ?? 'ws';
  const chunks = transport === 'direct' || transport === 'openai'; // OpenAI chunk framing
  const ui = transport === 'vercel'; // the AI SDK's UI message chunks
  const model = opt.model ?? (transport === 'direct' ? 'm' : 'assistant');
  const ramp = Number(opt.ramp ?? 1300);
  const duration = Number(opt.duration ?? 5000);
  const deltas = Number(opt.deltas ?? 64);
  const stallMs = Number(opt.stall ?? 200);
  const connectConcurrency = Number(opt.concurrency ?? 256);
  const hardDeadline = Number(opt.deadline ?? ramp + duration + 60_000);

  // --dump FILE writes one line per token: client, stream no, index, sent ms, received ms,
  // request ms (for digging into a bad run).
  const dump = opt.dump ? [] : null;
  const ttft = [];
  const gaps = [];
  const latency = [];
  const errors = {};
  const counts = {
    streams_started: 0, streams_completed: 0, streams_failed: 0, tokens: 0, missing: 0,
    duplicates: 0, stalls: 0, slow_first: 0, connect_failures: 0, deliveries: 0,
  };
  let firstRequestAt = Infinity;
  let lastTokenAt = 0;
  const addError = (msg) => {
    const key = String(msg).slice(0, 160);
    errors[key] = (errors[key] ?? 0) + 1;
  };

  let t0 = 0;
  let clientsDone = 0;
  let finished = false;

  class Client {
    constructor(id) {
      this.id = id;
      this.sock = null;
      this.ready = false;
      this.inStream = false;
      this.done = false;
      this.streamNo = 0;
      this.onReady = null;
    }
    connect(onReady) {
      this.onReady = onReady;
      this.ready = false;
      const sock = net.connect({ host: HOST, port: PORT, noDelay: true });
      this.sock = sock;
      sock.on('connect', () => {
        if (transport === 'ws') {
          this.ws = new WsParser((op, p) => this.onWs(op, p));
          this.handshake = true;
          this.headBuf = null;
          sock.write(wsHandshake(HOST, PORT));
        } else {
          this.http = new HttpSseParser(
            (status) => this.onHttpHead(status),
            (line) => this.onSseData(line),
            (closeAfter) => this.onHttpEnd(closeAfter),
          );
          this.becomeReady();
        }
      });
      sock.on('data', (d) => this.onBytes(d));
      sock.on('error', (e) => this.lost(`socket error ${e.code || e.message}`));
      sock.on('close', () => this.lost('connection closed'));
    }
    becomeReady() {
      this.ready = true;
      const cb = this.onReady;
      this.onReady = null;
      if (cb) cb(true);
    }
    lost(why) {
      if (this.sock === null) return;
      this.sock.destroy();
      this.sock = null;
      if (this.onReady) {
        counts.connect_failures++;
        addError(`connect: ${why}`);
        const cb = this.onReady;
        this.onReady = null;
        cb(false);
        this.end();
        return;
      }
      if (this.inStream) this.failStream(why);
      if (!this.done && this.pendingNext) {
        // A keep-alive connection the server closed between streams: open a new one.
        this.pendingNext = false;
        this.connect(() => this.startStream());
      } else if (!this.done && !this.inStream && !this.closing) {
        this.end();
      }
    }
    onBytes(d) {
      const t = nowMs();
      this.rt = t;
      if (transport === 'ws') {
        if (this.handshake) {
          const buf = this.headBuf ? Buffer.concat([this.headBuf, d]) : d;
          const idx = buf.indexOf('\r\n\r\n');
          if (idx < 0) {
            this.headBuf = buf;
            return;
          }
          this.handshake = false;
          const head = buf.toString('latin1', 0, idx);
          if (!head.startsWith('HTTP/1.1 101')) {
            addError(`handshake: ${head.split('\r\n')[0]}`);
            this.lost('handshake refused');
            return;
          }
          if (idx + 4 < buf.length) this.ws.feed(buf.subarray(idx + 4));
          return;
        }
        this.ws.feed(d);
      } else {
        this.http.feed(d);
      }
    }
    // --- ws
    onWs(opcode, payload) {
      if (opcode === 0x9) {
        this.sock?.write(wsFrame(0xa, payload));
        return;
      }
      if (opcode === 0x8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        if (this.inStream) this.failStream(`ws close ${code} ${payload.toString('utf8', 2)}`);
        if (!this.closing) addError(`ws close ${code}`);
        this.closing = true;
        this.sock?.end();
        return;
      }
      if (opcode !== 0x1) return;
      const msg = JSON.parse(payload.toString('utf8'));
      switch (msg.type) {
        case 'stream.event':
          this.onEvent(msg);
          break;
        case 'welcome':
          this.becomeReady();
          break;
        case 'error':
          if (this.inStream) this.failStream(`error ${msg.code}: ${msg.message}`);
          else addError(`error ${msg.code}: ${msg.message}`);
          break;
        default:
          break;
      }
    }
    onEvent(ev) {
      if (!this.inStream) return;
      if (ev.event === 'content') this.onContent(ev.delta);
      else if (ev.event === 'complete') this.completeStream();
      else if (ev.event === 'error') this.failStream(`stream error ${ev.error?.code}: ${ev.error?.message}`);
      else if (ev.event === 'cancelled') this.failStream(`stream cancelled ${ev.reason}`);
    }
    // --- http (sse, direct)
    onHttpHead(status) {
      this.status = status;
      if (status !== 200 && this.inStream) this.httpError = `HTTP ${status}`;
    }
    onSseData(line) {
      if (!this.inStream) return;
      if (this.httpError) {
        this.httpError += ` ${line.slice(0, 120)}`;
        return;
      }
      if (chunks || ui) {
        if (line === '[DONE]') {
          this.sawDone = true;
          return;
        }
        const doc = JSON.parse(line);
        if (ui) {
          if (doc.type === 'text-delta') this.onContent(doc.delta);
          else if (doc.type === 'error' || doc.type === 'abort') {
            this.httpError = `ui ${doc.type}: ${doc.errorText ?? doc.reason}`;
          }
          return;
        }
        const c = doc.choices?.[0]?.delta?.content;
        if (c) this.onContent(c);
      } else {
        this.onEvent(JSON.parse(line));
      }
    }
    onHttpEnd(closeAfter) {
      if (this.inStream) {
        if (this.httpError) this.failStream(this.httpError);
        else if ((chunks || ui) && this.sawDone) this.completeStream();
        else this.failStream('response ended before the terminal event');
      }
      this.httpError = null;
      if (closeAfter) this.sock?.end();
    }
    // --- one stream
    startStream() {
      if (this.sock === null) {
        if (this.done) return;
        this.connect(() => this.startStream());
        return;
      }
      this.inStream = true;
      this.streamNo++;
      this.expect = 0;
      this.prevAt = 0;
      this.carry = '';
      this.sawDone = false;
      this.httpError = null;
      counts.streams_started++;
      let req;
      if (transport === 'ws') {
        req = wsText(JSON.stringify({ type: 'stream.start', input: 'bench', ref: `r${this.streamNo}` }));
      } else if (transport === 'sse') {
        const body = '{"input":"bench"}';
        req =
          `POST /v1/streams HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\nContent-Type: application/json\r\n` +
          `Accept: text/event-stream\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
      } else if (ui) {
        const body = `{"id":"bench-${process.pid}-${this.id}-${this.streamNo}",` +
          '"messages":[{"id":"m","role":"user","parts":[{"type":"text","text":"bench"}]}]}';
        req =
          `POST /v1/ui/chat HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\n` +
          `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
      } else if (transport === 'openai') {
        const body = `{"model":${JSON.stringify(model)},"messages":[{"role":"user","content":"bench"}],` +
          '"stream":true}';
        req =
          `POST /v1/chat/completions HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\n` +
          `Content-Type: application/json\r\nAccept: text/event-stream\r\n` +
          `Content-Length: ${body.length}\r\n\r\n${body}`;
      } else {
        const body = `{"model":${JSON.stringify(model)},"messages":[{"role":"user","content":"bench"}],` +
          '"stream":true,"stream_options":{"include_usage":true}}';
        req =
          `POST /v1/chat/completions HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\n` +
          `Content-Type: application/json\r\nAccept: text/event-stream\r\n` +
          `Content-Length: ${body.length}\r\n\r\n${body}`;
      }
      this.reqAt = nowMs();
      if (this.reqAt < firstRequestAt) firstRequestAt = this.reqAt;
      this.sock.write(req);
    }
    onContent(delta) {
      const t = this.rt;
      counts.deliveries++;
      lastTokenAt = t;
      // A stamp may be split over deliveries (an output filter that holds text back, such as
      // raafd's redact, releases text at any character): the unfinished tail waits for the
      // rest, and the stamp counts when its '|' arrives.
      const text = this.carry ? this.carry + delta : delta;
      let start = 0;
      for (;;) {
        const bar = text.indexOf('|', start);
        if (bar < 0) break;
        const at = text.indexOf('@', start);
        const idx = Number(text.slice(start, at));
        const sent = Number(text.slice(at + 1, bar));
        start = bar + 1;
        // Per token: the tokens of one delivery after its first arrived with it (gap 0), as
        // tokens in separate events read from one TCP segment do.
        if (this.prevAt === 0) {
          const first = t - this.reqAt;
          ttft.push(first);
          if (first > stallMs) counts.slow_first++;
        } else {
          const gap = t - this.prevAt;
          gaps.push(gap);
          if (gap > stallMs) counts.stalls++;
        }
        this.prevAt = t;
        latency.push(t - sent);
        if (dump) dump.push(`${this.id}\t${this.streamNo}\t${idx}\t${sent.toFixed(3)}\t${t.toFixed(3)}\t${this.reqAt.toFixed(3)}`);
        counts.tokens++;
        if (idx === this.expect) this.expect++;
        else if (idx > this.expect) {
          counts.missing += idx - this.expect;
          this.expect = idx + 1;
        } else counts.duplicates++;
      }
      this.carry = start < text.length ? text.slice(start) : '';
    }
    completeStream() {
      if (this.expect < deltas) counts.missing += deltas - this.expect;
      counts.streams_completed++;
      this.afterStream();
    }
    failStream(why) {
      if (!this.inStream) return;
      counts.streams_failed++;
      addError(why);
      this.afterStream(100);
    }
    afterStream(delay = 0) {
      this.inStream = false;
      if (nowMs() - t0 >= duration) {
        this.end();
        return;
      }
      if (this.sock === null) {
        this.connect(() => this.startStream());
        return;
      }
      if (transport !== 'ws' && this.http && this.http.state !== 'head') {
        // The response is not over yet (an error on SSE arrives before the body's end).
        this.pendingNext = true;
        this.http.onEnd = (closeAfter) => {
          this.http.onEnd = (c) => this.onHttpEnd(c);
          this.pendingNext = false;
          if (closeAfter) {
            this.sock?.end();
            this.sock = null;
          }
          setTimeout(() => this.startStream(), delay);
        };
        return;
      }
      if (delay) setTimeout(() => this.startStream(), delay);
      else this.startStream();
    }
    end() {
      if (this.done) return;
      this.done = true;
      if (this.sock) {
        this.closing = true;
        if (transport === 'ws') this.sock.write(wsFrame(0x8, Buffer.from([0x03, 0xe8])));
        this.sock.end();
        const s = this.sock;
        setTimeout(() => s.destroy(), 2000).unref();
      }
      clientsDone++;
      if (clientsDone === N) report();
    }
  }

  function report() {
    if (finished) return;
    finished = true;
    const window = Math.max(1e-9, (lastTokenAt - firstRequestAt) / 1000);
    if (dump) fs.writeFileSync(opt.dump, dump.join('\n') + '\n');
    out({
      mode: 'stream', transport, n: N, ramp_ms: ramp, duration_ms: duration, deltas,
      ...counts,
      tokens_per_s: Math.round(counts.tokens / window),
      window_s: Math.round(window * 1000) / 1000,
      ttft_ms: summary(ttft), gap_ms: summary(gaps), latency_ms: summary(latency),
      errors, cpu_ms: cpuMs(),
    });
    setTimeout(() => process.exit(0), 50);
  }

  setTimeout(() => {
    addError('loadgen hard deadline reached');
    report();
  }, hardDeadline).unref();

  // Connect every client (at most `connectConcurrency` at once), then schedule the starts.
  const clients = Array.from({ length: N }, (_, i) => new Client(i));
  let next = 0;
  let settled = 0;
  const connectT0 = nowMs();
  const pump = () => {
    while (next < N && next - settled < connectConcurrency) {
      const c = clients[next++];
      c.connect(() => {
        settled++;
        if (settled === N) begin();
        else pump();
      });
    }
  };
  const begin = () => {
    const connectMs = nowMs() - connectT0;
    if (connectMs > 0) counts.connect_ms = Math.round(connectMs);
    t0 = nowMs() + 50;
    for (const c of clients) {
      if (c.done) continue;
      const at = t0 + (c.id * ramp) / N;
      setTimeout(() => c.startStream(), Math.max(0, at - nowMs()));
    }
  };
  pump();
}

// --- idle mode --------------------------------------------------------------------------------

function idleMode() {
  const sources = Number(opt.sources ?? 1);
  const concurrency = Number(opt.concurrency ?? 200);
  const hold = Number(opt.hold ?? 300);
  const socks = [];
  let open = 0;
  let failed = 0;
  let settled = 0;
  let next = 0;
  let closedByServer = 0;
  const failures = {};
  const t0 = nowMs();

  const one = (i) => {
    const localAddress = `127.0.0.${1 + (i % sources)}`;
    const sock = net.connect({ host: HOST, port: PORT, localAddress, noDelay: true });
    let state = 'connecting';
    let head = null;
    const parser = new WsParser((op, payload) => {
      if (op === 0x9) sock.write(wsFrame(0xa, payload));
      else if (op === 0x8) {
        if (state === 'open' && !closing) closedByServer++;
        state = 'closed';
        sock.end();
      } else if (op === 0x1 && state === 'handshake') {
        const msg = JSON.parse(payload.toString('utf8'));
        if (msg.type === 'welcome') {
          state = 'open';
          open++;
          done();
        }
      }
    });
    const fail = (why) => {
      if (state === 'open' || state === 'failed' || state === 'closed') return;
      state = 'failed';
      failed++;
      failures[why] = (failures[why] ?? 0) + 1;
      sock.destroy();
      done();
    };
    sock.on('connect', () => {
      state = 'handshake';
      sock.write(wsHandshake(HOST, PORT));
    });
    sock.on('data', (d) => {
      if (head !== false) {
        const buf = head ? Buffer.concat([head, d]) : d;
        const idx = buf.indexOf('\r\n\r\n');
        if (idx < 0) {
          head = buf;
          return;
        }
        if (!buf.toString('latin1', 0, 12).startsWith('HTTP/1.1 101')) {
          fail(`handshake ${buf.toString('latin1', 0, buf.indexOf('\r\n'))}`);
          return;
        }
        head = false;
        if (idx + 4 < buf.length) parser.feed(buf.subarray(idx + 4));
        return;
      }
      parser.feed(d);
    });
    sock.on('error', (e) => fail(`socket ${e.code || e.message}`));
    sock.on('close', () => {
      if (state === 'open' && !closing) closedByServer++;
      fail('closed before welcome');
      state = 'closed';
    });
    socks.push(sock);
  };
  let readyPrinted = false;
  const done = () => {
    settled++;
    if (settled === N && !readyPrinted) {
      readyPrinted = true;
      out({ event: 'ready', open, failed, failures, elapsed_s: Math.round(nowMs() - t0) / 1000 });
      return;
    }
    pump();
  };
  const pump = () => {
    while (next < N && next - settled < concurrency) one(next++);
  };
  let closing = false;
  const closeAll = () => {
    if (closing) return;
    closing = true;
    const closeFrame = wsFrame(0x8, Buffer.from([0x03, 0xe8]));
    for (const s of socks) {
      if (!s.destroyed) {
        s.write(closeFrame);
        s.end();
      }
    }
    const t = nowMs();
    const check = setInterval(() => {
      const alive = socks.filter((s) => !s.destroyed).length;
      if (alive === 0 || nowMs() - t > 10_000) {
        clearInterval(check);
        for (const s of socks) s.destroy();
        out({ event: 'closed', closed_by_server_while_idle: closedByServer, still_open: alive });
        setTimeout(() => process.exit(0), 50);
      }
    }, 100);
  };
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', closeAll);
  rl.on('close', closeAll);
  setTimeout(closeAll, hold * 1000).unref();
  pump();
}

// --- room mode --------------------------------------------------------------------------------

function openWs(i, token, onOpen, onText, onClose) {
  const sources = Number(opt.sources ?? 1);
  const localAddress = `127.0.0.${1 + (i % sources)}`;
  const sock = net.connect({ host: HOST, port: PORT, localAddress, noDelay: true });
  let head = null;
  const parser = new WsParser((op, payload) => {
    if (op === 0x9) sock.write(wsFrame(0xa, payload));
    else if (op === 0x8) {
      onClose(payload.length >= 2 ? payload.readUInt16BE(0) : 1005);
      sock.end();
    } else if (op === 0x1) onText(payload);
  });
  sock.on('connect', () => {
    const hs = wsHandshake(HOST, PORT);
    sock.write(token ? hs.replace('GET /v1/ws ', `GET /v1/ws?token=${token} `) : hs);
  });
  sock.on('data', (d) => {
    if (head !== false) {
      const buf = head ? Buffer.concat([head, d]) : d;
      const idx = buf.indexOf('\r\n\r\n');
      if (idx < 0) {
        head = buf;
        return;
      }
      head = false;
      onOpen(sock);
      if (idx + 4 < buf.length) parser.feed(buf.subarray(idx + 4));
      return;
    }
    parser.feed(d);
  });
  sock.on('error', () => onClose(-1));
  return sock;
}

function roomMode() {
  const rooms = Number(opt.rooms ?? 1);
  const rate = Number(opt.rate ?? 100);
  const duration = Number(opt.duration ?? 10_000);
  const window = Number(opt.window ?? 64);
  const concurrency = Number(opt.concurrency ?? 200);
  const token = opt.token ?? '';
  const latencies = [];
  let deliveries = 0;
  let joined = 0;
  let closed4001 = 0;
  let closedOther = 0;
  let gaps = 0;
  let sent = 0;
  let acked = 0;
  let errors = 0;
  let firstDelivery = 0;
  let lastDelivery = 0;
  const socks = [];
  const deadline = setTimeout(() => finish('deadline'), duration + 120_000);

  const member = (i) => {
    const room = `room-${i % rooms}`;
    let last = -1;
    const sock = openWs(
      i,
      token,
      () => {},
      (payload) => {
        // Cheap checks first: most frames are room.message.
        if (payload[9] === 0x72 && payload[16] === 0x73) {
          // {"type":"room.message","room":…,"id":N,…,"text":"mK @T|"…}: read id and T
          // without parsing the JSON (the generator's own cost must stay below the server's).
          const t = nowMs();
          const s = payload.toString('latin1');
          const i = s.indexOf('"id":') + 5;
          const id = Number(s.slice(i, s.indexOf(',', i)));
          const at = s.indexOf('@', s.indexOf('"text":'));
          latencies.push(t - Number(s.slice(at + 1, s.indexOf('|', at))));
          if (last >= 0 && id !== last + 1) gaps++;
          last = id;
          deliveries++;
          if (!firstDelivery) firstDelivery = t;
          lastDelivery = t;
          return;
        }
        const msg = JSON.parse(payload.toString('utf8'));
        if (msg.type === 'welcome') sock.write(wsText(JSON.stringify({ type: 'room.join', room, limit: 1 })));
        else if (msg.type === 'room.joined') {
          last = msg.head;
          joined++;
          if (joined === N) startPublishing();
          pump();
        } else if (msg.type === 'error') {
          errors++;
          process.stderr.write(`member error: ${JSON.stringify(msg)}\n`);
        }
      },
      (code) => {
        if (code === 4001) closed4001++;
        else if (!finishing) closedOther++;
      },
    );
    socks.push(sock);
  };
  let next = 0;
  const pump = () => {
    while (next < N && next - joined < concurrency) member(next++);
  };

  let finishing = false;
  let publishStarted = 0;
  let publishEnded = 0;
  const publishers = [];
  const startPublishing = () => {
    publishStarted = nowMs();
    const perRoom = Number(opt.publishers ?? 4);
    for (let pi = 0; pi < rooms * perRoom; pi++) {
      const r = pi % rooms;
      const share = rate / perRoom;
      let inFlight = 0;
      let count = 0;
      let open = false;
      const room = `room-${r}`;
      const sock = openWs(
        N + pi,
        token,
        () => {},
        (payload) => {
          const msg = JSON.parse(payload.toString('utf8'));
          if (msg.type === 'welcome') sock.write(wsText(JSON.stringify({ type: 'room.join', room, limit: 1 })));
          else if (msg.type === 'room.joined') open = true;
          else if (msg.type === 'room.sent') {
            inFlight--;
            acked++;
          } else if (msg.type === 'error') {
            inFlight--;
            errors++;
            process.stderr.write(`publisher error: ${JSON.stringify(msg)}\n`);
          }
        },
        () => {},
      );
      publishers.push(sock);
      // A steady rate: every tick sends what is due since the start (at most `window` unanswered).
      const tick = setInterval(() => {
        if (!open) return;
        const now = nowMs();
        if (now - publishStarted >= duration) {
          clearInterval(tick);
          if (++publishEnded === rooms * perRoom) setTimeout(() => finish('done'), 2000);
          return;
        }
        const due = Math.floor(((now - publishStarted) * share) / 1000);
        while (count < due && inFlight < window) {
          count++;
          inFlight++;
          sent++;
          const text = `m${pi}.${count} @${nowMs()}|`;
          sock.write(wsText(JSON.stringify({ type: 'room.send', room, text, ref: String(count) })));
        }
      }, 2);
    }
  };

  const finish = (why) => {
    if (finishing) return;
    finishing = true;
    clearTimeout(deadline);
    const span = (lastDelivery - firstDelivery) / 1000;
    out({
      event: 'room',
      why,
      members: N,
      rooms,
      joined,
      rate_per_room: rate,
      sent,
      acked,
      errors,
      deliveries,
      deliveries_per_s: span > 0 ? Math.round(deliveries / span) : 0,
      latency_ms: summary(latencies),
      closed_4001: closed4001,
      closed_other: closedOther,
      gaps,
      loadgen_cpu_ms: cpuMs(),
    });
    for (const s of [...socks, ...publishers]) s.destroy();
    setTimeout(() => process.exit(0), 50);
  };
  pump();
}

if (mode === 'stream') streamMode();
else if (mode === 'idle') idleMode();
else if (mode === 'room') roomMode();
else {
  process.stderr.write('usage: node bench/loadgen.mjs stream|idle|room --port P --n N ...\n');
  process.exit(2);
}
