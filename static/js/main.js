/*
 * Fast Channels · browser demo client.
 *
 * Wires the five panels of index.html to the server's WebSocket endpoints.
 * The same page is served by every tutorial step, so it first reads the
 * list of endpoints the running step serves (/endpoints.json) and shows a
 * friendly "arrives in step NN" notice on the panels whose endpoint is not
 * there yet. All panels share one helper, createChannel(), which owns the
 * socket, the status line, the close handling and reconnecting after a
 * drop; the panel code below only decides what to send and how to display
 * what comes back.
 *
 * Plain ES2020, no build step, no dependencies.
 */
'use strict';

/* ------------------------------------------------------------------ */
/* Small utilities                                                     */
/* ------------------------------------------------------------------ */

const $ = (id) => document.getElementById(id);

// Derived from the page location so the demo works behind any host, port
// or TLS terminator without configuration.
function wsUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${path}`;
}

// The WebSocket paths the running step serves, as it lists them in
// /endpoints.json (route patterns such as '/ws/room/{room_name}').
// Resolves to a Set, to null when the server has no such list (an older
// server, or the original Python app: the panels then probe), or to
// 'unreachable'. Fetched once, again after an unreachable server.
let endpointList = null;
function loadEndpoints() {
  if (!endpointList) {
    const loading = fetch('/endpoints.json', { cache: 'no-store' }).then(
      (res) => {
        if (!res.ok) return null;
        return res.json().then((paths) => (Array.isArray(paths) ? new Set(paths) : null), () => null);
      },
      () => 'unreachable',
    );
    loading.then((result) => {
      if (result === 'unreachable' && endpointList === loading) endpointList = null;
    });
    endpointList = loading;
  }
  return endpointList;
}

// The fallback without /endpoints.json: a plain GET to a WebSocket route
// is rejected with a 4xx that is not 404 (the upgrade headers are
// missing), while a route that does not exist gives 404.
async function probe(path) {
  try {
    const res = await fetch(path, { cache: 'no-store' });
    // The body is irrelevant; cancelling frees the connection sooner.
    if (res.body) res.body.cancel().catch(() => {});
    return res.status === 404 ? 'missing' : 'available';
  } catch {
    return 'unreachable';
  }
}

// Browsers hide why a WebSocket handshake failed (the close event says
// 1006, whatever the HTTP answer was), so after a failed handshake the
// page asks the same URL over plain HTTP. The server answers as it would
// have answered the handshake, as far as it can tell without the upgrade:
// 503 with Retry-After while it shuts down or is full, 404 for a route it
// does not have, 400 ("not a WebSocket request") when it would have let
// the handshake go on.
async function diagnose(path) {
  try {
    const res = await fetch(path, { cache: 'no-store' });
    if (res.body) res.body.cancel().catch(() => {});
    const seconds = Number.parseInt(res.headers.get('Retry-After') || '', 10);
    return { status: res.status, retryAfter: Number.isFinite(seconds) ? seconds * 1000 : 0 };
  } catch {
    return { status: 0, retryAfter: 0 };
  }
}

// Reconnecting, as Phoenix's and Socket.IO's clients do: exponential
// backoff from 0.5 s, doubling to at most 10 s, with "full jitter" (a
// random delay between 0 and that bound), so that the tabs of a server
// that went away do not all come back in the same instant.
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10000;
function backoff(attempt) {
  const bound = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt);
  return Math.random() * bound;
}

// Close codes after which trying again makes sense: the server went away
// (1001) or restarts (1012), asks to try later (1013), a proxy failed
// (1014), it hit an error of its own (1011), or the connection dropped
// without a close frame (1006). Every other code is a decision: 1000 (the
// server ended it), 1008 (a policy: too fast, not reading), 1007 and 1009
// (bad input), 4000-4999 (the app refused, e.g. an invalid room name).
const RETRY_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014]);

function timeStamp(date = new Date()) {
  return [date.getHours(), date.getMinutes(), date.getSeconds()]
    .map((n) => String(n).padStart(2, '0'))
    .join(':');
}

// Status messages are either a string or a list of strings and
// {code: '...'} parts, so step hints can show the command as code without
// ever going through innerHTML.
function renderStatus(el, message) {
  const parts = Array.isArray(message) ? message : [message];
  el.replaceChildren(
    ...parts.map((part) => {
      if (typeof part === 'string') return part;
      const code = document.createElement('code');
      code.textContent = part.code;
      return code;
    }),
  );
}

function stepNotice(lead, step) {
  return [`${lead} in step ${step} — run `, { code: `cargo xtask step ${step}` }];
}

// Periodic server pushes would otherwise grow the DOM without bound.
const LOG_LIMIT = 500;
// Only follow new entries when the reader is already at the bottom, so
// scrolling back through history is not yanked away by the next message.
const STICKY_SCROLL_PX = 48;

function appendLog(logEl, text, kind, data) {
  const distance = logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight;
  const follow = distance < STICKY_SCROLL_PX;

  const li = document.createElement('li');
  li.className = kind ? `log-entry log-${kind}` : 'log-entry';
  // Server text is user input relayed by the server: textContent only.
  li.textContent = text;
  if (data) {
    for (const [key, value] of Object.entries(data)) {
      if (value !== undefined && value !== null) li.dataset[key] = String(value);
    }
  }
  logEl.append(li);

  while (logEl.childElementCount > LOG_LIMIT) logEl.firstElementChild.remove();
  if (follow) logEl.scrollTop = logEl.scrollHeight;
  return li;
}

// Parses a frame that should be JSON; anything else comes back as null so
// callers can fall back to showing the raw text.
function parseObject(text) {
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === 'object' && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

function asText(value) {
  if (typeof value === 'string') return value;
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/* ------------------------------------------------------------------ */
/* The reusable panel connection                                       */
/* ------------------------------------------------------------------ */

/*
 * States, mirrored as data-state on the status element and on the closest
 * [data-channel] container so CSS and tests can follow along:
 *   idle         endpoint exists, not connected yet (manual panels)
 *   probing      checking whether the endpoint exists
 *   connecting   WebSocket created, waiting for open
 *   open         connected
 *   reconnecting the connection dropped; the next attempt is on a timer
 *   closed       disconnected, by the user or by the server's decision
 *   refused      the server refused: a close code 4000–4999, or a
 *                handshake refused while the server is up
 *   missing      endpoint not part of the running step
 *   unreachable  the page could not reach the server at all
 */
function createChannel(options) {
  const {
    path, // string, or function returning the path at connect time
    endpoint = typeof path === 'string' ? path : undefined, // as /endpoints.json lists it
    probePath = endpoint,
    missingLead, // e.g. 'Room chat arrives'
    step, // e.g. '02'
    statusEl,
    logEl,
    actionBtn = null, // Retry (unreachable), Reconnect (closed), Reconnect now
    controls = [], // enabled only while the socket is open
    offerReconnect = true,
    idleMessage = 'Not connected',
    describeOpen = () => 'Connected',
    onOpen = () => {},
    onMessage = (text) => appendLog(logEl, text),
    onStateChange = () => {},
  } = options;

  const container = statusEl.closest('[data-channel]');
  const decoder = new TextDecoder();
  let state = 'idle';
  let action = null;
  let socket = null;
  // Bumped whenever a check, socket or timer is superseded, so late
  // answers from an abandoned attempt cannot overwrite the current state.
  let generation = 0;
  let autoConnect = true;
  // Reconnecting: attempts since the last open, the pending timer, and
  // handshakes refused in a row while the server was up.
  let attempt = 0;
  let timer = null;
  let refusedHandshakes = 0;

  const resolvePath = () => (typeof path === 'function' ? path() : path);
  // The button offered when the page will not try again by itself.
  const manualAction = () => (offerReconnect ? 'reconnect' : null);

  function setState(next, message, nextAction = null) {
    state = next;
    action = nextAction;
    statusEl.dataset.state = next;
    if (container) container.dataset.state = next;
    if (message !== undefined) renderStatus(statusEl, message);

    const open = next === 'open';
    for (const control of controls) control.disabled = !open;

    if (actionBtn) {
      actionBtn.hidden = action === null;
      actionBtn.textContent = { retry: 'Retry', now: 'Reconnect now' }[action] || 'Reconnect';
    }
    onStateChange(next, api);
  }

  function cancelTimer() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  // Resolves true when the endpoint exists; otherwise leaves the panel in
  // its missing/unreachable state.
  async function check() {
    const gen = ++generation;
    setState('probing', 'Checking endpoint…');
    const listed = await loadEndpoints();
    let result;
    if (listed === 'unreachable') result = 'unreachable';
    else if (listed) result = listed.has(endpoint) ? 'available' : 'missing';
    else result = await probe(probePath !== undefined ? probePath : resolvePath());
    if (gen !== generation) return false;
    if (result === 'missing') {
      setState('missing', stepNotice(missingLead, step));
      return false;
    }
    if (result === 'unreachable') {
      setState('unreachable', 'Server unreachable', 'retry');
      return false;
    }
    return true;
  }

  // For panels that wait for the user: check now so a missing endpoint is
  // visible before anyone presses Connect.
  async function prepare() {
    autoConnect = false;
    if (await check()) setState('idle', idleMessage);
  }

  // Waits, showing the countdown, then tries again. `why` says what
  // happened, e.g. "Disconnected (code 1001): server shutting down".
  function scheduleReconnect(why, atLeast = 0) {
    cancelTimer();
    const gen = ++generation;
    const due = Date.now() + Math.max(atLeast, backoff(attempt));
    attempt += 1;
    const tick = () => {
      if (gen !== generation) return;
      const left = due - Date.now();
      if (left <= 0) {
        cancelTimer();
        open();
        return;
      }
      setState('reconnecting', `${why} · reconnecting in ${Math.ceil(left / 1000)} s`, 'now');
    };
    tick();
    if (gen === generation && state === 'reconnecting') timer = setInterval(tick, 250);
  }

  // After a handshake that failed before the socket opened: find out why
  // over HTTP, then wait, give up, or call the endpoint missing.
  async function afterFailedHandshake(wsPath) {
    const gen = generation;
    setState('reconnecting', 'Connection failed · checking the server…', 'now');
    const { status, retryAfter } = await diagnose(wsPath);
    if (gen !== generation) return;
    if (status === 404) {
      endpointList = null; // another step may be running now
      setState('missing', stepNotice(missingLead, step));
    } else if (status === 403) {
      setState('refused', 'Refused by the server (HTTP 403): see its log', manualAction());
    } else if (status === 400 && ++refusedHandshakes >= 3) {
      // Three times in a row the server was up and the handshake still
      // failed: a refusal (another origin, or the endpoint's own decision),
      // not a drop. (Behind a proxy, the HTTP question may reach another
      // server than the handshake did, hence more than one try.)
      setState('refused', 'The server refused the connection (another origin?): see its log',
        manualAction());
    } else {
      const why = status ? `Connection failed (HTTP ${status})` : 'Server unreachable';
      scheduleReconnect(why, retryAfter);
    }
  }

  // Opens the socket, without checking the endpoint again.
  function open() {
    const wsPath = resolvePath();
    let ws;
    try {
      ws = new WebSocket(wsUrl(wsPath));
    } catch (err) {
      setState('closed', `Could not open connection: ${err && err.message ? err.message : err}`,
        manualAction());
      return;
    }
    generation++;
    ws.binaryType = 'arraybuffer';
    socket = ws;
    let opened = false;
    setState('connecting', attempt > 0 ? 'Reconnecting…' : 'Connecting…');

    ws.addEventListener('open', () => {
      if (ws !== socket) return;
      opened = true;
      attempt = 0;
      refusedHandshakes = 0;
      setState('open', describeOpen());
      try {
        onOpen(api);
      } catch (err) {
        console.error(err);
      }
    });

    ws.addEventListener('message', (event) => {
      if (ws !== socket) return;
      const text = typeof event.data === 'string' ? event.data : decoder.decode(event.data);
      try {
        onMessage(text, api);
      } catch (err) {
        // A display bug must never lose the frame or break the socket.
        console.error(err);
        appendLog(logEl, text, 'raw');
      }
    });

    // 'error' carries no detail in browsers and is always followed by
    // 'close', so all reporting happens there.
    ws.addEventListener('close', (event) => {
      if (ws !== socket) return;
      socket = null;
      const { code, reason } = event;
      const manual = manualAction();
      if (!opened) {
        afterFailedHandshake(wsPath);
      } else if (code >= 4000 && code <= 4999) {
        let message = `Refused (code ${code})`;
        if (reason) message = /^refused\b/i.test(reason) ? reason : `Refused: ${reason}`;
        setState('refused', message, manual);
      } else {
        const message = reason
          ? `Disconnected (code ${code}): ${reason}`
          : `Disconnected (code ${code})`;
        if (RETRY_CODES.has(code)) scheduleReconnect(message);
        else setState('closed', message, manual);
      }
    });
  }

  async function connect() {
    if (['probing', 'connecting', 'open'].includes(state)) return;
    cancelTimer();
    attempt = 0;
    refusedHandshakes = 0;
    if (!(await check())) return;
    open();
  }

  function disconnect(code = 1000, reason = 'Client disconnected') {
    generation++;
    cancelTimer();
    const ws = socket;
    // Dropping the reference first means the socket's own close event is
    // ignored: the user asked for this, so it is not an error.
    socket = null;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch (err) {
        console.error(err);
      }
    }
    setState('closed', 'Disconnected');
  }

  function send(data) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    try {
      socket.send(data);
      return true;
    } catch (err) {
      console.error(err);
      return false;
    }
  }

  if (actionBtn) {
    actionBtn.addEventListener('click', () => {
      if (action === 'retry') {
        if (autoConnect) connect();
        else prepare();
      } else if (action === 'now') {
        // For the impatient: the attempt the timer would have made, now.
        cancelTimer();
        open();
      } else {
        connect();
      }
    });
  }

  const api = {
    connect,
    prepare,
    disconnect,
    send,
    log: (text, kind, data) => appendLog(logEl, text, kind, data),
    status: (message) => renderStatus(statusEl, message),
    get state() {
      return state;
    },
  };
  return api;
}

// Enter in a text input submits its form, which gives "Enter sends" for
// free; the handler gets the trimmed-or-not text and decides what to do.
function onSubmit(form, handler) {
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    try {
      handler();
    } catch (err) {
      console.error(err);
    }
  });
}

// Sends the input's text through a channel and clears it on success.
// Whitespace-only messages are ignored: they would only add blank lines.
function bindComposer(form, input, channel, encode = (text) => text, afterSend = () => {}) {
  onSubmit(form, () => {
    const text = input.value;
    if (text.trim() === '') return;
    if (channel.send(encode(text))) {
      afterSend(text);
      input.value = '';
      input.focus();
    }
  });
}

/* ------------------------------------------------------------------ */
/* Panels                                                              */
/* ------------------------------------------------------------------ */

function setupSystem() {
  const logEl = $('system-log');
  const input = $('system-input');

  const channel = createChannel({
    path: '/ws/system',
    missingLead: 'System messages arrive',
    step: '01',
    statusEl: $('system-status'),
    logEl,
    actionBtn: $('system-reconnect'),
    controls: [input, $('system-send')],
  });

  bindComposer($('system-form'), input, channel, undefined, (text) => {
    appendLog(logEl, `👤 User: ${text}`, 'user');
  });
  return channel;
}

function setupRoom() {
  const nameInput = $('room-name');
  const connectBtn = $('room-connect');
  const disconnectBtn = $('room-disconnect');
  const input = $('room-input');
  let currentRoom = '';

  const channel = createChannel({
    path: () => `/ws/room/${encodeURIComponent(currentRoom)}`,
    endpoint: '/ws/room/{room_name}',
    probePath: '/ws/room/general',
    missingLead: 'Room chat arrives',
    step: '02',
    statusEl: $('room-status'),
    logEl: $('room-log'),
    actionBtn: $('room-retry'),
    controls: [input, $('room-send')],
    // After the server's refusal, the Connect button is the way back in.
    offerReconnect: false,
    idleMessage: 'Not connected. Pick a room and press Connect.',
    describeOpen: () => `Connected to room '${currentRoom}'`,
    onStateChange: (state) => {
      const canConnect = state === 'idle' || state === 'closed' || state === 'refused';
      connectBtn.disabled = !canConnect;
      nameInput.disabled = !canConnect;
      disconnectBtn.disabled = !['open', 'connecting', 'reconnecting'].includes(state);
    },
  });

  onSubmit($('room-connect-form'), () => {
    if (connectBtn.disabled) return;
    if (nameInput.value === '') {
      channel.status('Enter a room name first.');
      nameInput.focus();
      return;
    }
    // Captured once so the URL and the status line agree even if the
    // input changes while connecting.
    currentRoom = nameInput.value;
    channel.connect();
  });

  disconnectBtn.addEventListener('click', () => {
    channel.disconnect(1000, 'User left the room');
    connectBtn.focus();
  });

  // No local echo: the server broadcasts the message back to its sender.
  bindComposer($('room-form'), input, channel);
  return channel;
}

// The end of a job id is enough to tell jobs apart (a ULID ends in random
// characters) and short enough for a badge on a phone.
function shortJobId(id) {
  return typeof id === 'string' && id !== '' ? `…${id.slice(-6)}` : undefined;
}

function setupJobs() {
  const typeSelect = $('job-type');
  const input = $('job-input');

  const channel = createChannel({
    path: '/ws/backgroundjob',
    missingLead: 'Background jobs arrive',
    step: '03',
    statusEl: $('job-status'),
    logEl: $('job-log'),
    actionBtn: $('job-reconnect'),
    controls: [typeSelect, input, $('job-send')],
    onMessage: (text, api) => {
      const frame = parseObject(text);
      if (!frame || !('message' in frame)) {
        api.log(text, 'raw');
        return;
      }
      const message = asText(frame.message);
      // `job` is shown as a badge on the "queued" line and on the result,
      // so a reader can tell which result answers which job.
      const data = { jobId: frame.job_id, job: shortJobId(frame.job_id), status: frame.status };
      if (frame.type === 'job_result') {
        api.log(message, 'result', data);
      } else if (frame.status === 'error') {
        api.log(message, 'error', data);
      } else {
        api.log(message, 'muted', data);
      }
    },
  });

  // Empty content is allowed on purpose: validating it is the server's
  // job, and its error reply is part of what this panel demonstrates.
  onSubmit($('job-form'), () => {
    const payload = JSON.stringify({ type: typeSelect.value, content: input.value });
    if (channel.send(payload)) {
      input.value = '';
      input.focus();
    }
  });
  return channel;
}

function setupShowcase() {
  const summaryEl = $('showcase-status');
  const panel = $('showcase-panel');
  const channels = [];

  // The showcase as a whole gets one summary line so a reader can tell at
  // a glance whether step 04 is running.
  function summarise() {
    if (channels.length < 4) return;
    const states = channels.map((c) => c.state);
    let state;
    let message;
    if (states.every((s) => s === 'missing')) {
      state = 'missing';
      message = stepNotice('The showcase arrives', '04');
    } else if (states.every((s) => s === 'unreachable')) {
      state = 'unreachable';
      message = 'Server unreachable';
    } else if (states.some((s) => s === 'probing' || s === 'connecting' || s === 'idle')) {
      state = 'connecting';
      message = 'Connecting…';
    } else {
      const open = states.filter((s) => s === 'open').length;
      state = open === channels.length ? 'open' : 'partial';
      message = `${open} of ${channels.length} connected`;
    }
    summaryEl.dataset.state = state;
    panel.dataset.state = state;
    renderStatus(summaryEl, message);
  }

  function sub(name, lead, extra = {}) {
    return createChannel({
      path: `/ws/${name}`,
      missingLead: lead,
      step: '04',
      statusEl: $(`${name}-status`),
      logEl: $(`${name}-log`),
      actionBtn: $(`${name}-reconnect`),
      onStateChange: summarise,
      ...extra,
    });
  }

  const chat = sub('chat', 'Chat arrives', {
    controls: [$('chat-input'), $('chat-send')],
  });
  bindComposer($('chat-form'), $('chat-input'), chat);

  const reliable = sub('reliable', 'Reliable messaging arrives', {
    controls: [$('reliable-input'), $('reliable-send')],
  });
  bindComposer($('reliable-form'), $('reliable-input'), reliable);

  const notifications = sub('notifications', 'Notifications arrive', {
    controls: [$('notifications-input'), $('notifications-send')],
    onMessage: (text, api) => {
      const frame = parseObject(text);
      if (!frame || !('message' in frame)) {
        api.log(text, 'raw');
        return;
      }
      // The type goes into a data attribute (shown as a badge by CSS) so
      // the entry's text stays exactly the message.
      const type = typeof frame.type === 'string' ? frame.type : undefined;
      api.log(asText(frame.message), 'notification', { type });
    },
  });
  bindComposer($('notifications-form'), $('notifications-input'), notifications,
    (text) => JSON.stringify({ message: text }));

  const sendBtn = $('analytics-send');
  const analytics = sub('analytics', 'Analytics arrives', { controls: [sendBtn] });
  sendBtn.addEventListener('click', () => {
    analytics.send(`button_click:send-analytics@${timeStamp()}`);
  });

  channels.push(chat, reliable, notifications, analytics);
  return channels;
}

// The room of step 06: who is here, the room's history on join, and on a
// reconnect (the channel's jittered backoff) what was missed, asked for
// with the position of the last message seen and marked as recovered.
function setupPresence() {
  const roomInput = $('presence-room');
  const nameInput = $('presence-name');
  const joinBtn = $('presence-connect');
  const leaveBtn = $('presence-disconnect');
  const input = $('presence-input');
  const logEl = $('presence-log');
  const membersEl = $('presence-members');
  let room = '';
  let name = '';
  // The position of the last message shown: sent again on a reconnect.
  let last = null;
  // name -> [version, here]: a diff changes a name only if its version is
  // newer than what the page holds for it (diffs from two servers may
  // arrive out of order).
  let members = new Map();
  let stateVersion = 0;
  let reconnecting = false;

  const path = () => {
    let p = `/ws/presence/${encodeURIComponent(room)}?name=${encodeURIComponent(name)}`;
    if (last) p += `&offset=${last.offset}&epoch=${encodeURIComponent(last.epoch)}`;
    return p;
  };

  function showMembers() {
    const here = [...members].filter(([, [, present]]) => present).map(([who]) => who).sort();
    membersEl.replaceChildren(...here.map((who) => {
      const li = document.createElement('li');
      li.textContent = who;
      return li;
    }));
    membersEl.dataset.count = String(here.length);
  }

  function showMessage(message, recovered) {
    const li = appendLog(logEl, `${message.name}: ${message.text}`, recovered ? 'recovered' : undefined,
      { offset: message.offset });
    last = { offset: message.offset, epoch: message.epoch };
    return li;
  }

  function onFrame(text) {
    const frame = parseObject(text);
    if (!frame) {
      appendLog(logEl, text, 'raw');
      return;
    }
    switch (frame.type) {
      case 'presence_state':
        stateVersion = frame.version;
        members = new Map(frame.members.map((who) => [who, [frame.version, true]]));
        showMembers();
        break;
      case 'presence_diff':
        for (const [key, present] of [['joins', true], ['leaves', false]]) {
          for (const who of frame[key]) {
            const held = members.has(who) ? members.get(who)[0] : stateVersion;
            if (frame.version > held) members.set(who, [frame.version, present]);
          }
        }
        showMembers();
        break;
      case 'history':
        if (frame.recovered === false) {
          appendLog(logEl, 'Some messages are no longer kept; here are the latest', 'muted');
        }
        for (const message of frame.messages) showMessage(message, reconnecting);
        if (reconnecting && frame.recovered) {
          appendLog(logEl, `Recovered ${frame.messages.length} missed message(s)`, 'muted');
        }
        reconnecting = false;
        break;
      case 'message':
        showMessage(frame, false);
        break;
      case 'error':
        appendLog(logEl, frame.message, 'error');
        break;
      default:
        appendLog(logEl, text, 'raw');
    }
  }

  const channel = createChannel({
    path,
    endpoint: '/ws/presence/{room_name}',
    missingLead: 'The presence room arrives',
    step: '06',
    statusEl: $('presence-status'),
    logEl,
    actionBtn: $('presence-retry'),
    controls: [input, $('presence-send')],
    offerReconnect: false,
    idleMessage: 'Not connected. Pick a room and a name, and press Join.',
    describeOpen: () => `In room '${room}' as ${name}`,
    onMessage: onFrame,
    onStateChange: (state) => {
      const canJoin = state === 'idle' || state === 'closed' || state === 'refused';
      joinBtn.disabled = !canJoin;
      roomInput.disabled = !canJoin;
      nameInput.disabled = !canJoin;
      leaveBtn.disabled = !['open', 'connecting', 'reconnecting'].includes(state);
      if (state === 'reconnecting') reconnecting = true;
    },
  });

  onSubmit($('presence-connect-form'), () => {
    if (joinBtn.disabled) return;
    if (roomInput.value === '' || nameInput.value === '') {
      channel.status('Enter a room and a name first.');
      (roomInput.value === '' ? roomInput : nameInput).focus();
      return;
    }
    // A new join starts afresh: the history on join replaces what was shown.
    if (roomInput.value !== room || nameInput.value !== name) last = null;
    room = roomInput.value;
    name = nameInput.value;
    if (!last) logEl.replaceChildren();
    reconnecting = last !== null;
    channel.connect();
  });

  leaveBtn.addEventListener('click', () => {
    channel.disconnect(1000, 'User left the room');
    members = new Map();
    showMembers();
    joinBtn.focus();
  });

  bindComposer($('presence-form'), input, channel,
    (text) => JSON.stringify({ type: 'message', text }));
  return channel;
}

/* ------------------------------------------------------------------ */
/* Start-up                                                            */
/* ------------------------------------------------------------------ */

function init() {
  const system = setupSystem();
  const room = setupRoom();
  const jobs = setupJobs();
  const showcase = setupShowcase();
  const presence = setupPresence();

  // One fetch of /endpoints.json serves every panel; each settles on its own.
  system.connect();
  room.prepare();
  jobs.connect();
  for (const channel of showcase) channel.connect();
  presence.prepare();
}

if (document.readyState === 'loading') {
  document.addEventListener('DOMContentLoaded', init);
} else {
  init();
}
