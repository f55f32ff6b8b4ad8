// The Vercel AI SDK (`ai`, pinned in package.json) against a running raafd.
//
//   node ui_chat.mjs SCENARIO BASE_URL CHAT_ID TEXT
//
// prints one JSON object (what the SDK ended up with) on stdout; tests/test_vercel_node.py
// starts the daemon, runs this and checks the result against the daemon's own stream.
import {
  AbstractChat,
  DefaultChatTransport,
  readUIMessageStream,
} from 'ai';

const [scenario, base, chatId, text] = process.argv.slice(2);
const api = `${base}/v1/ui/chat`;

const userMessage = {
  id: 'u1',
  role: 'user',
  parts: [{ type: 'text', text }],
};

// The smallest ChatState: what @ai-sdk/react keeps in React state, in plain fields.
class PlainState {
  constructor() {
    this.status = 'ready';
    this.error = undefined;
    this.messages = [];
  }
  pushMessage(message) {
    this.messages = [...this.messages, message];
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = this.messages.map((m, i) => (i === index ? message : m));
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new PlainState() });
  }
}

// A fetch that cuts the chat's POST response after `frames` SSE frames, as a dropped network
// does: the socket is closed (raafd sees the client leave and detaches) and the SDK's reader
// gets the TypeError a browser's fetch gives for a lost connection.
function cuttingFetch(frames) {
  return async (url, init) => {
    const response = await fetch(url, init);
    if (init?.method !== 'POST' || !response.body) return response;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = '';
    let count = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const { value, done } = await reader.read();
        if (done) {
          controller.close();
          return;
        }
        buffered += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffered.indexOf('\n\n')) >= 0) {
          const frame = buffered.slice(0, end + 2);
          buffered = buffered.slice(end + 2);
          controller.enqueue(new TextEncoder().encode(frame));
          if (++count >= frames) {
            await reader.cancel();
            controller.error(new TypeError('network error: connection lost (test)'));
            return;
          }
        }
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

// A fetch that turns the SDK's stop() (an abort of the chat's POST) into raafd's stop, so
// stopping cancels the run instead of leaving it detached for a resume.
function stoppingFetch(pending) {
  return async (url, init) => {
    if (init?.method === 'POST' && init.signal) {
      init.signal.addEventListener('abort', () => {
        pending.push(fetch(`${api}/${encodeURIComponent(chatId)}/stream`, { method: 'DELETE' }));
      });
    }
    return fetch(url, init);
  };
}

function textOf(message) {
  return message.parts
    .filter(p => p.type === 'text')
    .map(p => p.text)
    .join('');
}

async function waitFor(predicate, what) {
  const deadline = Date.now() + 15000;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise(resolve => setTimeout(resolve, 5));
  }
}

const scenarios = {
  // The transport and the stream reader: every message state the SDK built, the last one whole.
  async read() {
    const transport = new DefaultChatTransport({ api });
    const stream = await transport.sendMessages({
      chatId,
      messages: [userMessage],
      trigger: 'submit-message',
      messageId: undefined,
      abortSignal: undefined,
    });
    let last;
    const errors = [];
    for await (const message of readUIMessageStream({
      stream,
      onError: error => errors.push(String(error?.message ?? error)),
    })) {
      last = message;
    }
    return { message: last, text: textOf(last), errors };
  },

  // useChat's flow: the connection drops mid-answer, resumeStream() replays the answer from
  // raafd's log (the SDK's default: a replay from the start resets the partial message).
  async resumeReplay() {
    const chat = new Chat({
      id: chatId,
      transport: new DefaultChatTransport({ api, fetch: cuttingFetch(12) }),
    });
    await chat.sendMessage({ text });
    const afterDrop = {
      status: chat.status,
      text: chat.lastMessage?.role === 'assistant' ? textOf(chat.lastMessage) : '',
    };
    await chat.resumeStream();
    const assistants = chat.messages.filter(m => m.role === 'assistant');
    return {
      afterDrop,
      error: String(chat.error?.message ?? ''),
      status: chat.status,
      assistants: assistants.length,
      message: chat.lastMessage,
      text: textOf(chat.lastMessage),
    };
  },

  // A reader that keeps the last SSE id it has read drops the connection after a few frames,
  // then reconnects through the SDK's transport with that id as Last-Event-ID: raafd sends
  // exactly the rest, and the SDK's reader builds the whole message from the first frames
  // followed by the rest.
  async resumeRest() {
    const response = await fetch(api, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id: chatId, messages: [userMessage], trigger: 'submit-message' }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const first = [];
    let buffered = '';
    let lastId;
    let dropped = false;
    while (!dropped) {
      const { value, done } = await reader.read();
      if (done) throw new Error('the answer ended before the drop');
      buffered += decoder.decode(value, { stream: true });
      let end;
      while (!dropped && (end = buffered.indexOf('\n\n')) >= 0) {
        const frame = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        for (const line of frame.split('\n')) {
          if (line.startsWith('data: ')) first.push(JSON.parse(line.slice(6)));
          if (line.startsWith('id: ')) lastId = line.slice(4);
        }
        // Drop after an event's last frame (the one with its id); what follows in the
        // buffer is lost with the connection, as the network would lose it.
        dropped = first.length >= 8 && frame.includes('id: ');
      }
    }
    const firstChunks = first.length;
    await reader.cancel(); // the connection closes: raafd detaches, the run goes on
    const transport = new DefaultChatTransport({ api });
    const rest = await transport.reconnectToStream({
      chatId,
      headers: { 'last-event-id': lastId },
    });
    const restChunks = [];
    const whole = new ReadableStream({
      async start(controller) {
        for (const chunk of first) controller.enqueue(chunk);
        for await (const chunk of rest) {
          restChunks.push(chunk);
          controller.enqueue(chunk);
        }
        controller.close();
      },
    });
    let message;
    for await (message of readUIMessageStream({ stream: whole })) {
      // the last state is the whole message
    }
    return {
      lastId,
      firstChunks,
      firstText: first.filter(c => c.type === 'text-delta').map(c => c.delta).join(''),
      restTypes: restChunks.map(c => c.type),
      message,
      text: textOf(message),
    };
  },

  // stop() mid-answer: the run is cancelled in raafd (and its upstream request closed).
  async stop() {
    const pending = [];
    const chat = new Chat({
      id: chatId,
      transport: new DefaultChatTransport({ api, fetch: stoppingFetch(pending) }),
    });
    const sending = chat.sendMessage({ text });
    await waitFor(
      () => chat.lastMessage?.role === 'assistant' && textOf(chat.lastMessage).length > 0,
      'the first text',
    );
    await chat.stop();
    await sending;
    const stops = await Promise.all(pending);
    return {
      status: chat.status,
      stops: stops.map(r => r.status),
      message: chat.lastMessage,
      text: textOf(chat.lastMessage),
    };
  },
};

const run = scenarios[scenario];
if (!run) {
  console.error(`unknown scenario ${scenario}`);
  process.exit(2);
}
const result = await run();
process.stdout.write(JSON.stringify(result) + '\n');
