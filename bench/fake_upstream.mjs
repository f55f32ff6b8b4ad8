// A fast fake OpenAI-compatible upstream for bench/stream_bench.py.
//
// POST /v1/chat/completions answers a Chat Completions event stream: the role chunk, then
// DELTAS content chunks paced INTERVAL ms apart (the first one at once), then the finish chunk,
// the usage chunk and `data: [DONE]`, each as its own HTTP chunk. GET /v1/models lists "m".
//
// Every content delta carries its index and its send time:  "<index>@<ms>|"  where <ms> is
// CLOCK_MONOTONIC in milliseconds (process.hrtime), the clock every process on the machine
// shares, so the load generator can compute one-way latency from it. raafd passes the text
// through untouched as the event's `delta` (and coalesces adjacent deltas by concatenation, which
// this format survives).
//
// Usage: node bench/fake_upstream.mjs [--port 0] [--deltas 64] [--interval 20] [--ttl 1800]
// Prints one JSON line {"port": N} on stdout once listening. Exits on SIGTERM/SIGINT, when stdin
// closes (its parent died), or after --ttl seconds, whichever comes first.

import http from 'node:http';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
    return acc;
  }, []),
);
const PORT = Number(args.port ?? 0);
const DELTAS = Number(args.deltas ?? 64);
const INTERVAL = Number(args.interval ?? 20);
const TTL = Number(args.ttl ?? 1800);

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

const CREATED = 1700000000;
const head = (delta, finish) =>
  JSON.stringify({
    id: 'chatcmpl-bench',
    object: 'chat.completion.chunk',
    created: CREATED,
    model: 'm',
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
  });
// The content chunk is built by string concatenation around a fixed prefix: at 25k deltas/s
// a JSON.stringify per delta is measurable on a shared core.
const CONTENT_PREFIX =
  'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":' + CREATED +
  ',"model":"m","choices":[{"index":0,"delta":{"content":"';
const CONTENT_SUFFIX = '"},"logprobs":null,"finish_reason":null}]}\n\n';
const ROLE = 'data: ' + head({ role: 'assistant', content: '' }, null) + '\n\n';
const TAIL =
  'data: ' + head({}, 'stop') + '\n\n' +
  'data: ' + JSON.stringify({
    id: 'chatcmpl-bench', object: 'chat.completion.chunk', created: CREATED, model: 'm',
    choices: [], usage: { prompt_tokens: 8, completion_tokens: DELTAS, total_tokens: 8 + DELTAS },
  }) + '\n\n' +
  'data: [DONE]\n\n';

let active = 0;
let served = 0;

function stream(req, res) {
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
  });
  res.write(ROLE);
  active++;
  served++;
  let i = 0;
  let timer = null;
  let done = false;
  const start = nowMs();
  const finish = () => {
    if (done) return;
    done = true;
    active--;
    if (timer) clearTimeout(timer);
  };
  res.on('close', finish);
  const tick = () => {
    timer = null;
    if (done) return;
    const t = nowMs();
    res.write(CONTENT_PREFIX + i + '@' + t.toFixed(3) + '|' + CONTENT_SUFFIX);
    i++;
    if (i >= DELTAS) {
      res.end(TAIL);
      finish();
      return;
    }
    // Paced against the stream's own start, so timer lateness does not accumulate.
    const due = start + i * INTERVAL;
    timer = setTimeout(tick, Math.max(0, due - nowMs()));
  };
  tick();
}

const server = http.createServer({ keepAliveTimeout: 60_000, noDelay: true }, (req, res) => {
  const path = (req.url || '').split('?')[0];
  if (req.method === 'POST' && path.endsWith('/chat/completions')) {
    // The body is read (so the connection stays reusable) and ignored: every request streams.
    req.on('data', () => {});
    req.on('end', () => stream(req, res));
    return;
  }
  if (req.method === 'GET' && path.endsWith('/models')) {
    const body = JSON.stringify({ object: 'list', data: [{ id: 'm', object: 'model' }] });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length });
    res.end(body);
    return;
  }
  res.writeHead(404, { 'content-type': 'application/json' });
  res.end('{"error":{"message":"no route","type":"invalid_request_error"}}');
});
server.headersTimeout = 30_000;
server.requestTimeout = 0;
server.maxRequestsPerSocket = 0;

const stop = () => {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.on('error', stop);
process.stdin.resume();
setTimeout(stop, TTL * 1000).unref();

server.listen(PORT, '127.0.0.1', 4096, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});

// `kill -USR2` prints counters on stderr (handy when debugging the bench).
process.on('SIGUSR2', () => {
  process.stderr.write(JSON.stringify({ active, served }) + '\n');
});
