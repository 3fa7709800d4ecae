// The Portless web console: the browser side, one hand-written ES module (no build step, no
// dependencies). The server sends the same shell for every console path; this module reads
// `location.pathname`, draws the page into #main from the public API (`/v1/...`) and the event
// stream (`GET /v1/events`), and builds the navigation.
//
// Every piece of text that comes from the daemon (guest output, VM names, labels, command
// descriptions, audit reasons, error messages) is hostile: it reaches the page only as text
// nodes, through `h()` and `textContent`, never as HTML. Nothing here sets inline styles or
// inline handlers, so the page runs under the console's strict Content-Security-Policy.

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

/** Characters of output kept in the DOM per pane; older text is dropped. */
const PANE_DOM_CAP = 256 * 1024;
/** Characters of output written to the DOM per animation frame, over all panes... */
const FRAME_BUDGET = 64 * 1024;
/** ...but at least this many per pane. */
const SINK_MIN_SHARE = 8 * 1024;
/** Characters of output per block of a pane's DOM, ended at a newline when one comes... */
const CHUNK_CHARS = 16 * 1024;
/** ...before this many (a block of a very long line ends here). */
const CHUNK_MAX_CHARS = 64 * 1024;
/** Executions one event stream follows (the daemon's MAX_STREAM_EXECUTIONS). */
const STREAM_EXECUTIONS = 64;
/** Bytes per page of an execution's kept output. */
const OUTPUT_PAGE = 64 * 1024;
/** The largest program the API takes in a push (MAX_PUSH_BYTES). */
const MAX_PUSH_BYTES = 64 * 1024 * 1024;
/** Executions per page of the history. */
const HISTORY_PAGE = 50;
/** Requests the page runs at once when it asks about many VMs or executions. */
const PARALLEL = 6;
/** Pushes sent at once (the daemon takes in `callers.pushes_in_flight`, 4 by default). */
const PARALLEL_PUSHES = 2;
/** A partial line longer than this goes into the merged view without waiting for its end. */
const MERGED_LINE_MAX = 4096;

/** Execution states (ExecState), in the daemon's order; those of a fleet's control plane
 * last. All but the ACTIVE ones are final. */
const EXEC_STATES = [
  'pending', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled', 'agent_lost',
  'undeliverable', 'rejected', 'failed_to_start', 'delayed', 'in_progress',
  'delivery_timed_out', 'host_lost',
];
/** The states that are not final: waiting for a VM or a host, or running. */
const ACTIVE_STATES = new Set(['pending', 'running', 'delayed', 'in_progress']);
/** VM agent states (VmState) and how the page names them. */
const VM_STATES = {
  waiting_for_agent: 'waiting',
  ready: 'ready',
  unresponsive: 'unresponsive',
  cut_off: 'cut off',
  host_offline: 'host offline',
};
/** Audit actions the daemon records, offered as suggestions in the audit filter. */
const AUDIT_ACTIONS = [
  'list_vms', 'list_commands', 'exec', 'read_execution', 'cancel', 'push', 'ping', 'metrics',
  'read_audit', 'read_daemon', 'whoami', 'console_code', 'console_request', 'console_login',
  'console_logout', 'list_hosts', 'list_executions', 'read_command', 'upload_program',
];

const CSRF = document.querySelector('meta[name="portless-csrf"]')?.content ?? '';
const main = document.getElementById('main');
const statusArea = document.getElementById('status');

// ---------------------------------------------------------------------------------------
// DOM helpers: every element is built with h(), text always as text nodes
// ---------------------------------------------------------------------------------------

/** Properties set on the element (after its children, so a <select> finds its options). */
const PROPS = new Set(['value', 'checked', 'selected', 'disabled', 'hidden', 'indeterminate']);

/**
 * Builds an element. `attrs`: attributes (strings, numbers; `true` for a bare attribute;
 * null, undefined and false are left out), `class` (a string or a list), `on` (event
 * listeners), and the properties in PROPS. Children: nodes, strings (as text), lists.
 */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  const props = [];
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value == null || value === false) continue;
    if (key === 'on') {
      for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    } else if (key === 'class') {
      el.className = Array.isArray(value) ? value.filter(Boolean).join(' ') : value;
    } else if (PROPS.has(key)) {
      props.push([key, value]);
    } else if (key === 'style' || key.startsWith('on') || key === 'innerHTML') {
      throw new Error(`h(): ${key} is not allowed`);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  for (const [key, value] of props) el[key] = value;
  return el;
}

/** Replaces an element's children (as append() takes them). */
function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** Appends children (nodes, text, nested lists; null and false are skipped). */
function append(el, children) {
  for (const child of children) {
    if (child == null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

let uid = 0;
/** A fresh element id. */
const nextId = (prefix) => `${prefix}-${++uid}`;

/** Visually hidden text for screen readers. */
const srOnly = (text) => h('span', { class: 'sr-only' }, text);

/** A definition list of [term, value] pairs; rows whose value is null are left out. */
function facts(pairs, attrs) {
  return h('dl', { class: 'facts', ...attrs },
    pairs.filter(([, v]) => v != null).map(([term, value]) => [h('dt', null, term), h('dd', null, value)]));
}

/** A table in a horizontally scrollable, keyboard-focusable region. */
function tableRegion(caption, head, body, attrs) {
  const captionId = nextId('caption');
  const table = h('table', attrs,
    h('caption', { id: captionId }, caption),
    h('thead', null, h('tr', null, head.map((col) =>
      typeof col === 'string' ? h('th', { scope: 'col' }, col) : col))),
    body);
  return h('div', { class: 'table-wrap', role: 'region', 'aria-labelledby': captionId, tabindex: 0 }, table);
}

/** Chips for a VM's labels (`k=v`). */
function labelChips(labels) {
  const entries = Object.entries(labels ?? {});
  if (!entries.length) return h('span', { class: 'muted' }, 'none');
  return h('ul', { class: 'chips' }, entries.map(([k, v]) => h('li', { class: 'chip' }, `${k}=${v}`)));
}

/** A class name from a state name (which comes from the daemon). */
const stateClass = (state) => `state-${String(state).replace(/[^a-z_]/g, '')}`;

/** An execution state as a badge. */
function execBadge(state, attrs) {
  return h('span', { class: ['badge', stateClass(state)], ...attrs }, humanState(state));
}

/** An error in the page, for people. */
function problem(message, attrs) {
  return h('p', { class: 'problem', role: 'alert', ...attrs }, message);
}

/** Sets the document title. */
function setTitle(page) {
  document.title = `${page} · Portless console`;
}

// ---------------------------------------------------------------------------------------
// The status area (#status, aria-live polite) and the end of a session
// ---------------------------------------------------------------------------------------

let sessionGone = false;
let statusTimer = 0;

/** Shows a short message in the status area; it fades after a while unless `sticky`. */
function setStatus(message, { sticky = false } = {}) {
  if (sessionGone) return;
  clearTimeout(statusTimer);
  fill(statusArea, ...(message ? [h('p', null, message)] : []));
  if (message && !sticky) statusTimer = setTimeout(() => setStatus(''), 8000);
}

/** The session ended (logged out elsewhere, expired): say so once, stop every stream. */
function sessionEnded() {
  if (sessionGone) return;
  sessionGone = true;
  clearTimeout(statusTimer);
  closeAllStreams();
  fill(statusArea, h('p', { class: 'alert', 'data-test': 'session-ended' },
    'Your console session has ended. ', h('a', { href: '/console/login' }, 'Log in again'), '.'));
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, '0');

/** A time as local `2026-12-02 10:15:03`. */
function fmtTime(ms) {
  if (ms == null) return '—';
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A size in B, KiB, MiB, GiB. */
function fmtBytes(n) {
  if (n == null) return '—';
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v < 100 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** A duration: `840 ms`, `12.3 s`, `4 min 5 s`, `2 h 3 min`, `3 d 4 h`. */
function fmtDuration(ms) {
  if (ms == null) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return fmtSeconds(ms);
}

/** A duration in whole seconds, for clocks that tick. */
function fmtSeconds(ms) {
  const t = Math.max(0, Math.floor(ms / 1000));
  const d = Math.floor(t / 86400);
  const hr = Math.floor((t % 86400) / 3600);
  const m = Math.floor((t % 3600) / 60);
  const s = t % 60;
  if (d) return `${d} d ${hr} h`;
  if (hr) return `${hr} h ${m} min`;
  if (m) return `${m} min ${s} s`;
  return `${s} s`;
}

/** `timed_out` as `timed out`. */
const humanState = (state) => String(state ?? 'unknown').replaceAll('_', ' ');

/** Whether an execution state is final (anything but pending and running). */
const isFinal = (state) => !ACTIVE_STATES.has(state);

/** Arguments as a shell would show them: plain words bare, anything else quoted. */
function fmtArgs(args) {
  return (args ?? []).map((a) => (/^[A-Za-z0-9._/=:,@+%-]+$/.test(a) ? a : JSON.stringify(a))).join(' ');
}

/** How an execution ended: `exit 0`, `signal 9`, or nothing yet. */
function fmtExit(rec) {
  if (rec?.exit_code != null) return `exit ${rec.exit_code}`;
  if (rec?.signal != null) return `signal ${rec.signal}`;
  return '';
}

/** A `datetime-local` value as ms since the epoch (local time), or null. */
function localInputToMs(value) {
  if (!value) return null;
  const ms = new Date(value).getTime();
  return Number.isFinite(ms) ? ms : null;
}

/** UTF-8 length of a string, as the agent counts string arguments. */
const utf8Length = (s) => new TextEncoder().encode(s).length;

// ---------------------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------------------

const enc = encodeURIComponent;
const vmHref = (vm) => `/console/vms/${enc(vm)}`;
const execHref = (id) => `/console/executions/${enc(id)}`;
const rawHref = (id, stream) => `/v1/executions/${enc(id)}/output?stream=${stream}`;
const watchHref = (ids) => `/console/watch?${ids.map((id) => `execution=${enc(id)}`).join('&')}`;

/** A query string from [key, value] pairs, leaving out empty values. */
function queryString(pairs) {
  const q = new URLSearchParams();
  for (const [k, v] of pairs) if (v != null && v !== '') q.append(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : '';
}

/** A raw download link of one stream of an execution. */
function rawLink(id, stream, text = stream) {
  return h('a', { href: rawHref(id, stream), download: `execution-${id}.${stream}`, 'data-test': `raw-${stream}` }, text);
}

// ---------------------------------------------------------------------------------------
// The API: same-origin fetch with the session cookie, CSRF token on every change
// ---------------------------------------------------------------------------------------

/** An error answer of the API: its status (0 when the daemon was not reached) and message. */
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Whether an error answer means the session ended. */
const isSessionEnd = (status, message) =>
  status === 401 || (status === 403 && /\bsession\b/i.test(message));

/** The message of an error answer (`{"error": "..."}`, or its text). */
async function errorMessage(res) {
  const text = await res.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === 'string') return body.error;
  } catch {
    // not JSON: use the text itself
  }
  return text.trim().slice(0, 500) || `${res.status} ${res.statusText}`.trim();
}

/**
 * Calls the API. `json`: a JSON body; `body`: a raw one; `raw`: return the Response instead
 * of its JSON. Throws ApiError on an error answer (and reports an ended session).
 */
async function api(path, { method = 'GET', json, body, raw = false } = {}) {
  const headers = { Accept: raw ? '*/*' : 'application/json' };
  if (method !== 'GET' && method !== 'HEAD') headers['X-CSRF-Token'] = CSRF;
  const init = { method, headers, credentials: 'same-origin' };
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `The daemon could not be reached (${e.message}).`);
  }
  if (!res.ok) {
    const message = await errorMessage(res);
    if (isSessionEnd(res.status, message)) sessionEnded();
    throw new ApiError(res.status, message);
  }
  return raw ? res : res.json();
}

/** Runs `fn` over `items`, at most `limit` at once; each result is {ok, value} or {ok, error}. */
async function settleAll(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      try {
        results[i] = { ok: true, value: await fn(items[i], i) };
      } catch (error) {
        results[i] = { ok: false, error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

/** Refusals at dispatch (Dispatched::refused): no id, an error, or a state it never ran in. */
const refusedDispatch = (d) =>
  d.id == null || d.error != null ||
  ['rejected', 'undeliverable', 'agent_lost', 'failed_to_start'].includes(d.state);

// ---------------------------------------------------------------------------------------
// Argument checks, mirroring the agent's (agent-core config::check_value and charset.rs)
// ---------------------------------------------------------------------------------------

/**
 * Parses a character class as the agent does: single characters and ranges `a-z`; a `-` is
 * literal first or last; `\` makes the next character literal. Returns [low, high] code point
 * pairs, or null when the class does not parse (then only lengths are checked here).
 */
function parseCharset(cls) {
  const chars = Array.from(cls ?? '');
  if (!chars.length) return null;
  const ranges = [];
  let i = 0;
  let first = true;
  while (i < chars.length) {
    const c = chars[i++];
    const atStart = first;
    first = false;
    let low;
    if (c === '\\') {
      if (i >= chars.length) return null;
      low = chars[i++];
    } else if (c === '-') {
      if (atStart || i === chars.length) {
        ranges.push([45, 45]);
        continue;
      }
      return null;
    } else {
      low = c;
    }
    if (chars[i] === '-' && i + 1 < chars.length) {
      i += 1;
      let high = chars[i++];
      if (high === '\\') {
        if (i >= chars.length) return null;
        high = chars[i++];
      } else if (high === '-') {
        return null;
      }
      const [lo, hi] = [low.codePointAt(0), high.codePointAt(0)];
      if (hi < lo) return null;
      ranges.push([lo, hi]);
    } else {
      const cp = low.codePointAt(0);
      ranges.push([cp, cp]);
    }
  }
  return ranges;
}

/** The first character of `s` outside `ranges`, or null. */
function outsideCharset(ranges, s) {
  for (const c of s) {
    const cp = c.codePointAt(0);
    if (!ranges.some(([lo, hi]) => cp >= lo && cp <= hi)) return c;
  }
  return null;
}

/** A length bound in words: `exactly 8`, `1 to 20`, `at most 20`. */
function lengthText(min, max) {
  if (min === max) return `exactly ${min}`;
  if (!min) return `at most ${max}`;
  return `${min} to ${max}`;
}

/** A bound of an integer parameter as a BigInt (exact beyond 2^53), or null if not whole. */
function bigInt(v) {
  try {
    return BigInt(v);
  } catch {
    return null;
  }
}

/** What is wrong with `raw` as a value of `param`, or '' when the agent would take it. */
function checkParam(param, raw, badInput = false) {
  switch (param.kind) {
    case 'integer': {
      const range = `${param.min} to ${param.max}`;
      if (badInput) return `Not a number: a whole number from ${range}.`;
      if (raw === '') return `Required: a whole number from ${range}.`;
      if (!/^[-+]?\d+$/.test(raw)) return `A whole number, digits only: from ${range}.`;
      const n = BigInt(raw);
      const [min, max] = [bigInt(param.min), bigInt(param.max)];
      if ((min != null && n < min) || (max != null && n > max)) return `${raw} is out of range: from ${range}.`;
      return '';
    }
    case 'choice':
      return (param.choices ?? []).includes(raw) ? '' : 'Choose one of the listed values.';
    case 'string': {
      const len = utf8Length(raw);
      if (len < param.min_len || len > param.max_len) {
        return `${len} bytes: must be ${lengthText(param.min_len, param.max_len)} bytes long.`;
      }
      const ranges = parseCharset(param.charset);
      const bad = ranges && outsideCharset(ranges, raw);
      return bad ? `${JSON.stringify(bad)} is not allowed: only characters of ${param.charset}.` : '';
    }
    default:
      return '';
  }
}

/** A value as sent: integers in the one canonical form the agent takes (no `+`, no 0s). */
function canonicalValue(param, raw) {
  if (param.kind === 'integer' && /^[-+]?\d+$/.test(raw)) return String(BigInt(raw));
  return raw;
}

/** Whether the tests switched the page's own checks off (the daemon then has the word). */
const clientChecksOff = () => document.body.dataset.skipClientChecks === '1';

// ---------------------------------------------------------------------------------------
// SHA-256 of a pushed program: crypto.subtle when there, else this small implementation
// ---------------------------------------------------------------------------------------

/** SHA-256 constants: fractional parts of the cube (K) and square (H) roots of primes. */
const SHA = (() => {
  const primes = [];
  for (let n = 2; primes.length < 64; n += 1) if (primes.every((p) => n % p)) primes.push(n);
  const frac = (x) => ((x - Math.floor(x)) * 2 ** 32) >>> 0;
  return {
    K: Uint32Array.from(primes, (p) => frac(Math.cbrt(p))),
    H: Uint32Array.from(primes.slice(0, 8), (p) => frac(Math.sqrt(p))),
  };
})();

/** SHA-256 in plain JS, for pages served without a secure context (no crypto.subtle). */
function sha256Fallback(bytes) {
  const { K } = SHA;
  const H = SHA.H.slice();
  const W = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  const block = (view, at) => {
    for (let i = 0; i < 16; i += 1) W[i] = view.getUint32(at + 4 * i);
    for (let i = 16; i < 64; i += 1) {
      const a = W[i - 15];
      const b = W[i - 2];
      const s0 = rotr(a, 7) ^ rotr(a, 18) ^ (a >>> 3);
      const s1 = rotr(b, 17) ^ rotr(b, 19) ^ (b >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
    }
    let [a, b, c, d, e, f, g, hh] = H;
    for (let i = 0; i < 64; i += 1) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      hh = g; g = f; f = e; e = (d + t1) | 0;
      d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    [a, b, c, d, e, f, g, hh].forEach((v, i) => { H[i] = (H[i] + v) | 0; });
  };
  const whole = bytes.length - (bytes.length % 64);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let at = 0; at < whole; at += 64) block(view, at);
  // The tail, the 0x80 marker and the length in bits, in one or two last blocks.
  const tail = new Uint8Array(bytes.length % 64 < 56 ? 64 : 128);
  tail.set(bytes.subarray(whole));
  tail[bytes.length - whole] = 0x80;
  const tailView = new DataView(tail.buffer);
  const bits = bytes.length * 8;
  tailView.setUint32(tail.length - 8, Math.floor(bits / 2 ** 32));
  tailView.setUint32(tail.length - 4, bits >>> 0);
  for (let at = 0; at < tail.length; at += 64) block(tailView, at);
  return Array.from(H, (v) => (v >>> 0).toString(16).padStart(8, '0')).join('');
}

/** The SHA-256 of a file, in hex. */
async function sha256Hex(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  if (globalThis.crypto?.subtle) {
    try {
      const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
      return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
    } catch {
      // fall through to the plain implementation
    }
  }
  return sha256Fallback(bytes);
}

// ---------------------------------------------------------------------------------------
// Ticking clocks (heartbeat ages, elapsed times): one timer for the whole page
// ---------------------------------------------------------------------------------------

const tickers = new Set();
let tickTimer = 0;

/** Calls `fn` every second until the returned function is called. */
function everySecond(fn) {
  tickers.add(fn);
  if (!tickTimer) tickTimer = setInterval(() => tickers.forEach((f) => f()), 1000);
  return () => tickers.delete(fn);
}

// ---------------------------------------------------------------------------------------
// Event streams (GET /v1/events): EventSource reconnects and resumes by itself
// ---------------------------------------------------------------------------------------

const openStreams = new Set();

function openStream(url) {
  const es = new EventSource(url);
  openStreams.add(es);
  return es;
}

function closeStream(es) {
  es.close();
  openStreams.delete(es);
}

function closeAllStreams() {
  for (const es of openStreams) es.close();
  openStreams.clear();
}

// Streams count against the principal's follow limit: give them back as the page goes.
window.addEventListener('pagehide', closeAllStreams);

/** Listens to event `name` of `es`; `fn` gets its JSON data (bad JSON is ignored). */
function onEvent(es, name, fn) {
  es.addEventListener(name, (event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    fn(data);
  });
}

/**
 * Reports a stream's health in the status area: "reconnecting…" while the browser retries;
 * when the daemon refused the stream (EventSource gives up), `onFatal` and a notice, or the
 * session notice if that was why.
 */
function reportStream(es, what, onFatal) {
  let broken = false;
  es.addEventListener('error', () => {
    if (es.readyState === EventSource.CLOSED) {
      openStreams.delete(es);
      if (sessionGone) return;
      onFatal?.();
      // Ask who we are: an ended session is reported by api() itself.
      api('/v1/whoami').then(
        () => setStatus(`Live ${what} stopped: the daemon refused the stream (too many open?). Reload to try again.`, { sticky: true }),
        () => {},
      );
    } else if (!broken) {
      broken = true;
      setStatus(`Live ${what}: reconnecting…`, { sticky: true });
    }
  });
  es.addEventListener('open', () => {
    if (broken) {
      broken = false;
      setStatus(`Live ${what}: connected again.`);
    }
  });
}

/** Follows every visible VM's state (`vm` events); returns the function that stops it. */
function followVms(onVm) {
  const es = openStream('/v1/events?vms=true');
  onEvent(es, 'vm', onVm);
  reportStream(es, 'VM states');
  return () => closeStream(es);
}

// ---------------------------------------------------------------------------------------
// Output sinks: text batched per animation frame, at most PANE_DOM_CAP characters in the DOM
// ---------------------------------------------------------------------------------------

const dirtySinks = new Set();
let frame = 0;
let soon = false;
let lastFlush = -Infinity;
/** After this long without a write, output is written at once rather than at the next frame. */
const IDLE_FLUSH_MS = 32;

/**
 * Writes pending output once per frame, sharing FRAME_BUDGET between the sinks. Output that
 * comes after a quiet spell is written at once (in a microtask, after the event that brought
 * it), so that the first line of a run shows without waiting for a frame; while output keeps
 * coming, writes wait for frames.
 */
function scheduleFlush(sink) {
  dirtySinks.add(sink);
  if (frame || soon) return;
  if (performance.now() - lastFlush > IDLE_FLUSH_MS) {
    soon = true;
    queueMicrotask(() => {
      soon = false;
      flushSinks();
    });
    return;
  }
  frame = requestAnimationFrame(() => {
    frame = 0;
    flushSinks();
  });
}

function flushSinks() {
  lastFlush = performance.now();
  const sinks = [...dirtySinks];
  dirtySinks.clear();
  const share = Math.max(SINK_MIN_SHARE, Math.floor(FRAME_BUDGET / Math.max(1, sinks.length)));
  for (const s of sinks) if (s.flush(share)) scheduleFlush(s);
}

/**
 * A <pre> that output is appended to. Text waits in `pending` for a frame, which writes as
 * much of it as the frame's budget allows. At most the cap waits: when output comes faster
 * than that, the oldest pending text is dropped unseen and a marker says so where it was
 * (the raw download has it all). Text goes into the DOM in blocks of
 * about CHUNK_CHARS (so that appending lays out the last block, not all of the output),
 * split after a newline when one comes soon enough; within a block, text is appended to the
 * last text node of the same kind. The oldest text is removed once the DOM holds more than
 * the cap, and `onTrim` is called the first time text is dropped.
 */
class OutputSink {
  constructor(pre, onTrim) {
    this.pre = pre;
    this.onTrim = onTrim;
    this.pending = [];
    this.pendingChars = 0;
    this.domChars = 0;
    this.chunk = null;
    this.chunkChars = 0;
    this.trimmed = false;
    this.skipped = false;
  }

  /** Adds text; `kind` is '' (stdout), 'stderr' or 'gap'. */
  push(text, kind = '') {
    if (!text) return;
    this.pending.push([text, kind]);
    this.pendingChars += text.length;
    while (this.pendingChars > PANE_DOM_CAP && this.pending.length > 1) {
      this.pendingChars -= this.pending.shift()[0].length;
      this.skipped = true;
    }
    if (this.pendingChars > PANE_DOM_CAP) {
      const [t, k] = this.pending[0];
      this.pending[0] = [t.slice(t.length - PANE_DOM_CAP), k];
      this.pendingChars = PANE_DOM_CAP;
      this.skipped = true;
    }
    if (this.skipped) this.dropped();
    scheduleFlush(this);
  }

  dropped() {
    if (!this.trimmed) {
      this.trimmed = true;
      this.onTrim?.();
    }
  }

  /** Writes up to `budget` characters of pending text; whether some still wait. */
  flush(budget) {
    if (!this.pending.length) return false;
    const pre = this.pre;
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 32;
    if (this.skipped) {
      this.skipped = false;
      if (this.domChars) this.write('\n[… output skipped: it came faster than the page shows it; the raw download has it all …]\n', 'gap');
    }
    let left = budget;
    while (left > 0 && this.pending.length) {
      const [text, kind] = this.pending[0];
      const piece = text.length <= left ? text : text.slice(0, left);
      if (piece.length === text.length) this.pending.shift();
      else this.pending[0] = [text.slice(piece.length), kind];
      this.pendingChars -= piece.length;
      left -= piece.length;
      this.write(piece, kind);
    }
    this.trim();
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    return this.pending.length > 0;
  }

  /** Writes text into the current block, starting a new block when it is full. */
  write(text, kind) {
    let rest = text;
    while (rest) {
      let piece = rest;
      if (this.chunk && this.chunkChars >= CHUNK_CHARS) {
        // Full: end it at the next newline, or (a very long line) right away.
        const nl = this.chunkChars < CHUNK_MAX_CHARS ? rest.indexOf('\n') : -1;
        if (nl < 0 || this.chunkChars + nl + 1 > CHUNK_MAX_CHARS) {
          this.chunk = null;
        } else {
          piece = rest.slice(0, nl + 1);
        }
      }
      if (!this.chunk) {
        this.chunk = h('div', { class: 'chunk' });
        this.chunkChars = 0;
        this.pre.append(this.chunk);
      }
      const last = this.chunk.lastChild;
      const lastKind = last && (last.nodeType === Node.TEXT_NODE ? '' : last.className);
      if (last && lastKind === kind && kind !== 'gap') {
        (last.nodeType === Node.TEXT_NODE ? last : last.firstChild).appendData(piece);
      } else {
        this.chunk.append(kind ? h('span', { class: kind }, piece) : document.createTextNode(piece));
      }
      this.chunkChars += piece.length;
      this.domChars += piece.length;
      rest = rest.slice(piece.length);
    }
  }

  /** Removes the oldest text beyond the cap: whole blocks, then the start of the first. */
  trim() {
    let excess = this.domChars - PANE_DOM_CAP;
    if (excess <= 0) return;
    while (excess > 0 && this.pre.firstChild) {
      const block = this.pre.firstChild;
      const len = block.textContent.length;
      if (len <= excess && block !== this.chunk) {
        block.remove();
        excess -= len;
        this.domChars -= len;
        continue;
      }
      // Part of the first block: from its first nodes.
      while (excess > 0 && block.firstChild) {
        const node = block.firstChild;
        const t = node.nodeType === Node.TEXT_NODE ? node : node.firstChild;
        const n = t ? t.length : 0;
        if (n <= excess) {
          node.remove();
          excess -= n;
          this.domChars -= n;
        } else {
          t.deleteData(0, excess);
          this.domChars -= excess;
          excess = 0;
        }
      }
      if (block === this.chunk) this.chunkChars = block.textContent.length;
      if (!block.firstChild) {
        if (block === this.chunk) this.chunk = null;
        block.remove();
      }
    }
    this.dropped();
  }
}

/** Base64 to bytes. */
function base64Bytes(s) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(s);
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) out[i] = bin.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------------------------------
// The watch component: one pane per execution, live from the event stream
// ---------------------------------------------------------------------------------------

/** One execution's pane: title, state, elapsed time, exit, detail, cancel, output. */
class Pane {
  constructor(watch, item) {
    this.watch = watch;
    this.id = String(item.id);
    this.rec = null;
    this.vm = item.vm ?? null;
    this.state = item.state ?? 'pending';
    this.shown = { stdout: 0, stderr: 0 };
    this.decoders = { stdout: new TextDecoder('utf-8'), stderr: new TextDecoder('utf-8') };
    this.mergedTail = { stdout: '', stderr: '' };

    const titleId = nextId('pane');
    this.vmEl = h('span', { class: 'pane-vm' });
    this.commandEl = h('code', { class: 'pane-command' });
    this.stateEl = execBadge(this.state, { 'data-test': 'pane-state' });
    this.elapsedEl = h('span', { class: 'pane-elapsed', 'data-test': 'pane-elapsed' });
    this.exitEl = h('span', { class: 'pane-exit', 'data-test': 'pane-exit' });
    this.detailEl = h('p', { class: 'pane-detail', 'data-test': 'pane-detail', hidden: true });
    this.noteEl = h('p', { class: 'pane-note', 'aria-live': 'polite' });
    this.cancelBtn = h('button', {
      type: 'button', class: 'danger', 'data-test': 'cancel',
      on: { click: () => this.cancel() },
    }, 'Cancel');
    this.trimNote = h('p', { class: 'trimmed', hidden: true },
      'Earlier output not shown — download raw: ', rawLink(this.id, 'stdout'), ', ', rawLink(this.id, 'stderr'), '.');
    this.pre = h('pre', { class: 'output', 'data-test': 'pane-output', tabindex: 0, 'aria-label': `Output of execution ${this.id}` });
    this.sink = new OutputSink(this.pre, () => { this.trimNote.hidden = false; });

    this.el = h('section', { class: 'pane', 'data-test': 'pane', 'data-execution': this.id, 'aria-labelledby': titleId },
      h('header', { class: 'pane-head' },
        h('h3', { id: titleId }, this.vmEl, ' ', this.commandEl),
        h('p', { class: 'pane-meta' }, this.stateEl, ' ', this.elapsedEl, ' ', this.exitEl)),
      this.detailEl,
      h('p', { class: 'pane-actions' }, this.cancelBtn, ' ',
        h('span', { class: 'links' }, 'Raw: ', rawLink(this.id, 'stdout'), ' · ', rawLink(this.id, 'stderr'),
          ' · ', h('a', { href: execHref(this.id) }, 'details'))),
      this.noteEl, this.trimNote, this.pre);
    this.update(item);
  }

  get final() {
    return isFinal(this.state);
  }

  /** Takes what is known of the execution (a Dispatched, or an ExecutionRecord). */
  update(rec) {
    if (rec.requested_at_ms != null) this.rec = rec;
    if (rec.vm && rec.vm !== this.vm) this.vm = rec.vm;
    if (this.vm) {
      this.el.dataset.vm = this.vm;
      fill(this.vmEl, h('a', { href: vmHref(this.vm) }, this.vm));
      this.pre.setAttribute('aria-label', `Output of ${this.vm} (execution ${this.id})`);
      this.cancelBtn.setAttribute('aria-label', `Cancel execution ${this.id} on ${this.vm}`);
    } else {
      this.vmEl.textContent = `Execution ${this.id}`;
    }
    const command = rec.command ?? this.rec?.command;
    if (command) this.commandEl.textContent = [command, fmtArgs(rec.args ?? this.rec?.args)].filter(Boolean).join(' ');
    if (rec.state && rec.state !== this.state) {
      this.state = rec.state;
      this.stateEl.className = `badge ${stateClass(this.state)}`;
      this.stateEl.textContent = humanState(this.state);
    }
    this.exitEl.textContent = fmtExit(this.rec);
    const detail = this.rec?.detail ?? rec.error;
    this.detailEl.textContent = detail ?? '';
    this.detailEl.hidden = !detail;
    this.cancelBtn.hidden = this.final;
    this.tick();
  }

  /** The elapsed time: ticking while it runs, how long it ran once ended. */
  tick() {
    const r = this.rec;
    if (!r) return;
    const start = r.started_at_ms ?? r.requested_at_ms;
    let text = '';
    if (this.final) {
      const ran = r.duration_ms ?? (r.finished_at_ms != null && r.started_at_ms != null ? r.finished_at_ms - r.started_at_ms : null);
      if (ran != null) text = `ran ${fmtDuration(ran)}`;
    } else if (start) {
      text = `${this.state === 'running' ? 'running' : 'waiting'} ${fmtSeconds(Date.now() - start)}`;
    }
    this.elapsedEl.textContent = text;
  }

  /** An `output` event: its bytes, decoded, after the bytes already shown. */
  output(ev) {
    const stream = ev.stream === 'stderr' ? 'stderr' : 'stdout';
    let bytes = base64Bytes(ev.data);
    const shown = this.shown[stream];
    if (ev.offset < shown) {
      // Already shown (a resumed stream overlapping): skip what was.
      if (ev.offset + bytes.length <= shown) return;
      bytes = bytes.subarray(shown - ev.offset);
    } else if (ev.offset > shown) {
      this.text(stream, `\n[${fmtBytes(ev.offset - shown)} of ${stream} not received]\n`, 'gap');
    }
    this.shown[stream] = Math.max(shown, ev.offset) + bytes.length;
    this.text(stream, this.decoders[stream].decode(bytes, { stream: true }));
  }

  /** Text of a stream, to this pane and to the watch's merged view. */
  text(stream, text, kind = stream === 'stderr' ? 'stderr' : '') {
    if (!text) return;
    this.sink.push(text, kind);
    this.merged(stream, text, kind, false);
  }

  /** Complete lines, prefixed `[vm] `, to the merged view; a partial line waits for its end. */
  merged(stream, text, kind, flush) {
    let tail = this.mergedTail[stream] + text;
    let cut = tail.lastIndexOf('\n') + 1;
    if (flush || tail.length - cut > MERGED_LINE_MAX) {
      if (tail && !tail.endsWith('\n')) tail += '\n';
      cut = tail.length;
    }
    this.mergedTail[stream] = tail.slice(cut);
    if (!cut) return;
    const prefix = `[${this.vm ?? this.id}] `;
    const lines = tail.slice(0, cut - 1).split('\n').map((l) => prefix + l).join('\n');
    this.watch.mergedSink.push(`${lines}\n`, kind);
  }

  /** The `end` event: the final record; what the decoders still hold. */
  finish(rec) {
    this.update(rec);
    for (const stream of ['stdout', 'stderr']) {
      this.text(stream, this.decoders[stream].decode());
      this.merged(stream, '', stream === 'stderr' ? 'stderr' : '', true);
    }
  }

  async cancel() {
    this.cancelBtn.disabled = true;
    this.noteEl.textContent = 'Cancelling…';
    try {
      await api(`/v1/executions/${enc(this.id)}/cancel`, { method: 'POST' });
      this.noteEl.textContent = 'Cancel requested.';
    } catch (e) {
      this.noteEl.textContent = e.status === 409 ? e.message : `Could not cancel: ${e.message}`;
      this.cancelBtn.disabled = false;
    }
  }
}

/**
 * A set of executions watched live: a toolbar (merged view, cancel all, summary), the merged
 * view and the panes. Executions are followed over event streams of at most 64 each.
 */
class Watch {
  constructor({ onEnd, single = false } = {}) {
    this.panes = new Map();
    this.streams = [];
    this.onEnd = onEnd;
    const mergedId = nextId('merged');
    this.mergedBox = h('input', { type: 'checkbox', id: mergedId, 'data-test': 'merged', on: { change: () => this.showMerged() } });
    this.cancelAll = h('button', { type: 'button', class: 'danger', 'data-test': 'cancel-all', on: { click: () => this.cancelEvery() } }, 'Cancel all');
    this.summary = h('p', { class: 'watch-summary', 'data-test': 'watch-summary', 'aria-live': 'polite' });
    this.mergedTrim = h('p', { class: 'trimmed', hidden: true }, 'Earlier output not shown: download each execution’s raw output from its pane.');
    this.mergedPre = h('pre', { class: 'output merged', 'data-test': 'merged-output', tabindex: 0, hidden: true, 'aria-label': 'Merged output of every execution' });
    this.mergedSink = new OutputSink(this.mergedPre, () => { this.mergedTrim.hidden = !this.mergedBox.checked; });
    this.list = h('div', { class: 'panes' });
    this.el = h('section', { class: 'watch', 'aria-label': 'Executions' },
      single ? null : h('div', { class: 'toolbar' },
        h('span', { class: 'check' }, this.mergedBox, h('label', { for: mergedId }, 'Merged view')),
        this.cancelAll, this.summary),
      this.mergedTrim, this.mergedPre, this.list);
    this.stopTicking = everySecond(() => {
      for (const p of this.panes.values()) if (!p.final) p.tick();
    });
  }

  /** Adds a pane per item ({id, vm, command?, args?, state?} or an ExecutionRecord). */
  add(items) {
    for (const item of items) {
      const id = String(item.id);
      if (this.panes.has(id)) continue;
      const pane = new Pane(this, item);
      this.panes.set(id, pane);
      this.list.append(pane.el);
    }
    this.refresh();
  }

  /**
   * Follows every pane not yet followed, 64 executions per stream. Ended executions too: the
   * stream sends their kept output, then their end.
   */
  start() {
    const followed = new Set(this.streams.flatMap((s) => [...s.ids]));
    const ids = [...this.panes.keys()].filter((id) => !followed.has(id));
    for (let i = 0; i < ids.length; i += STREAM_EXECUTIONS) this.follow(ids.slice(i, i + STREAM_EXECUTIONS));
  }

  follow(ids) {
    const es = openStream(`/v1/events?${ids.map((id) => `execution=${enc(id)}`).join('&')}`);
    const stream = { es, ids: new Set(ids), remaining: new Set(ids) };
    this.streams.push(stream);
    onEvent(es, 'execution', (rec) => {
      this.panes.get(String(rec.id))?.update(rec);
      this.refresh();
    });
    onEvent(es, 'output', (ev) => this.panes.get(String(ev.execution))?.output(ev));
    onEvent(es, 'end', (rec) => {
      const id = String(rec.id);
      this.panes.get(id)?.finish(rec);
      stream.remaining.delete(id);
      // Nothing more comes: close before the server ends the stream, or it would reconnect.
      if (!stream.remaining.size) closeStream(es);
      this.refresh(true);
      this.onEnd?.(rec);
    });
    reportStream(es, 'output', () => {
      for (const id of stream.remaining) {
        const pane = this.panes.get(id);
        if (pane) pane.noteEl.textContent = 'Live output stopped: reload the page to follow it again.';
      }
    });
  }

  /** The summary line, the cancel-all button, and (after an `end`) a word when all ended. */
  refresh(ended = false) {
    const counts = new Map();
    for (const p of this.panes.values()) counts.set(p.state, (counts.get(p.state) ?? 0) + 1);
    const parts = [...counts].map(([state, n]) => `${n} ${humanState(state)}`);
    this.summary.textContent = parts.join(' · ');
    const open = [...this.panes.values()].filter((p) => !p.final).length;
    this.cancelAll.hidden = open === 0;
    if (ended && open === 0 && !this.announced) {
      this.announced = true;
      setStatus(`${this.panes.size === 1 ? 'The execution' : `All ${this.panes.size} executions`} ended: ${parts.join(', ')}.`);
    }
  }

  showMerged() {
    const on = this.mergedBox.checked;
    this.el.classList.toggle('is-merged', on);
    this.mergedPre.hidden = !on;
    this.mergedTrim.hidden = !on || !this.mergedSink.trimmed;
    if (on) this.mergedPre.scrollTop = this.mergedPre.scrollHeight;
  }

  async cancelEvery() {
    const open = [...this.panes.values()].filter((p) => !p.final);
    this.cancelAll.disabled = true;
    await settleAll(open, PARALLEL, (p) => p.cancel());
    this.cancelAll.disabled = false;
    setStatus(`Cancel requested for ${open.length} execution${open.length === 1 ? '' : 's'}.`);
  }

  dispose() {
    for (const s of this.streams) closeStream(s.es);
    this.streams = [];
    this.stopTicking();
    this.el.remove();
  }
}

// ---------------------------------------------------------------------------------------
// The command form: one input per parameter, checked as the user types, run via POST /v1/exec
// ---------------------------------------------------------------------------------------

/** Whether a daemon's message names parameter `name` (quoted, in braces, or as a long word). */
function mentions(message, name) {
  if ([`"${name}"`, `'${name}'`, `{${name}}`, `\`${name}\``].some((q) => message.includes(q))) return true;
  if (name.length < 3) return false;
  const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(`(^|[^A-Za-z0-9_])${escaped}($|[^A-Za-z0-9_])`).test(message);
}

/** One input of the form, with its hint and its error message element. */
function formField({ label, input, hint, errorAttrs }) {
  const id = input.id;
  const hintId = `${id}-hint`;
  const errorId = `${id}-error`;
  input.setAttribute('aria-describedby', `${hintId} ${errorId}`);
  const error = h('p', { id: errorId, class: 'field-error', 'aria-live': 'polite', ...errorAttrs });
  const el = h('div', { class: 'field' }, h('label', { for: id }, label), input, h('p', { id: hintId, class: 'hint' }, hint), error);
  const setError = (message) => {
    error.textContent = message;
    if (message) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  };
  return { el, input, error, setError };
}

/** The input of one declared parameter. */
function paramInput(id, param) {
  switch (param.kind) {
    case 'integer':
      return {
        input: h('input', { type: 'number', id, name: param.name, min: param.min, max: param.max, step: 1, required: true, inputmode: 'numeric', placeholder: `${param.min}…${param.max}` }),
        hint: `Whole number, ${param.min}..${param.max}`,
      };
    case 'choice':
      return {
        input: h('select', { id, name: param.name, required: true }, (param.choices ?? []).map((c) => h('option', { value: c }, c))),
        hint: `One of ${(param.choices ?? []).length} choices`,
      };
    case 'string': {
      const known = parseCharset(param.charset) != null;
      return {
        input: h('input', { type: 'text', id, name: param.name, minlength: param.min_len || null, maxlength: param.max_len, required: param.min_len > 0, autocomplete: 'off', spellcheck: 'false' }),
        hint: `${lengthText(param.min_len, param.max_len)} bytes of ${param.charset}${known ? '' : ' (checked by the guest only)'}`,
      };
    }
    default:
      return {
        input: h('input', { type: 'text', id, name: param.name ?? `arg`, autocomplete: 'off', spellcheck: 'false' }),
        hint: `A parameter of kind ${param.kind ?? 'unknown'}: checked by the guest only`,
      };
  }
}

/**
 * A form that runs `command` on `target` (a POST /v1/exec target). `fanOut` adds max
 * concurrency and max errors. `onStarted(accepted)` gets the executions that were started.
 */
function commandForm({ command, target, targetText, fanOut = false, heading = 'h3', onStarted }) {
  const prefix = nextId('cmd');
  const formError = h('p', { class: 'problem', 'data-test': 'form-error', role: 'alert', hidden: true });
  const result = h('div', { class: 'dispatch', 'data-test': 'dispatch-result', 'aria-live': 'polite' });

  const params = (command.params ?? []).map((param, i) => {
    const { input, hint } = paramInput(`${prefix}-p${i}`, param);
    const field = formField({ label: param.name ?? `argument ${i + 1}`, input, hint, errorAttrs: { 'data-test': 'field-error', 'data-param': param.name ?? '' } });
    field.param = param;
    field.check = () => {
      const message = checkParam(param, input.value, input.validity?.badInput);
      field.setError(message);
      return message;
    };
    field.value = (raw) => (raw ? input.value : canonicalValue(param, input.value));
    return field;
  });

  // Timeout: the command's, in seconds; it may only be lowered.
  const maxS = command.timeout_ms ? command.timeout_ms / 1000 : null;
  const timeout = formField({
    label: 'Timeout (seconds)',
    input: h('input', { type: 'number', id: `${prefix}-timeout`, name: 'timeout', min: 0.001, max: maxS, step: 'any', value: maxS ?? '', placeholder: maxS ? null : 'none', inputmode: 'decimal' }),
    hint: maxS ? `At most ${fmtDuration(command.timeout_ms)}, the command's; lower it to stop sooner.` : 'The command has no timeout; set one to stop it sooner.',
    errorAttrs: { 'data-test': 'timeout-error' },
  });
  timeout.check = () => {
    const raw = timeout.input.value;
    let message = '';
    if (timeout.input.validity?.badInput) message = 'Not a number of seconds.';
    else if (raw !== '' && !(Number(raw) > 0)) message = 'More than 0 seconds.';
    else if (raw !== '' && maxS != null && Number(raw) > maxS) message = `At most ${maxS} s: the timeout can only be lowered.`;
    timeout.setError(message);
    return message;
  };

  const counters = fanOut ? [
    ['max_concurrency', 'Max concurrency', 1, 'How many run at once; empty for all at once.'],
    ['max_errors', 'Max errors', 0, 'Stop dispatching once more than this many failed; empty for no limit.'],
  ].map(([name, label, min, hint]) => {
    const field = formField({ label, input: h('input', { type: 'number', id: `${prefix}-${name}`, name, min, step: 1, inputmode: 'numeric' }), hint, errorAttrs: { 'data-test': `${name}-error` } });
    field.name = name;
    field.check = () => {
      const raw = field.input.value;
      const ok = raw === '' || (/^\d+$/.test(raw) && Number(raw) >= min);
      field.setError(ok ? '' : `A whole number, at least ${min}, or empty.`);
      return ok ? '' : 'bad';
    };
    return field;
  }) : [];

  const checked = [...params, timeout, ...counters];
  for (const field of checked) {
    const again = () => { if (!clientChecksOff()) field.check(); };
    field.input.addEventListener('input', again);
    field.input.addEventListener('change', again);
  }

  const runButton = h('button', { type: 'submit', class: 'primary', 'data-test': 'run' }, 'Run');
  const form = h('form', { class: 'card command-form', 'data-test': 'command-form', 'data-command': command.name, novalidate: true, 'aria-labelledby': `${prefix}-title` },
    h(heading, { id: `${prefix}-title`, class: 'command-name' }, command.name),
    command.description ? h('p', { class: 'description' }, command.description) : null,
    formError,
    params.length ? h('div', { class: 'fields' }, params.map((f) => f.el)) : h('p', { class: 'muted' }, 'No parameters.'),
    h('div', { class: 'fields' }, timeout.el, counters.map((f) => f.el)),
    h('p', { class: 'hint' }, `Output kept: ${command.max_output ? `up to ${fmtBytes(command.max_output)} per stream` : 'the agent’s default'}.`),
    h('p', { class: 'actions' }, runButton, ' ', h('span', { class: 'muted' }, `on ${targetText}`)),
    result);

  let busy = false;
  let lastArgs = [];

  /** Puts a daemon's message next to the field it names, else at the top of the form. */
  const place = (message) => {
    const arg = /\bargument (\d+)\b/.exec(message);
    const field = (arg && params[Number(arg[1]) - 1]) ||
      params.find((f) => f.param.name && mentions(message, f.param.name)) ||
      (/\btimeout/i.test(message) ? timeout : null) ||
      counters.find((f) => message.includes(f.name));
    if (field) {
      const before = field.error.textContent;
      field.setError(before ? `${before}; ${message}` : message);
    } else {
      formError.textContent = formError.textContent ? `${formError.textContent} ${message}` : message;
      formError.hidden = false;
    }
  };

  const clearMessages = () => {
    for (const f of checked) f.setError('');
    formError.textContent = '';
    formError.hidden = true;
    fill(result);
  };

  const showResult = (answer) => {
    const dispatched = answer.executions ?? [];
    const accepted = dispatched.filter((d) => !refusedDispatch(d));
    const items = [];
    dispatched.filter(refusedDispatch).forEach((d, i) => {
      const why = d.error ?? humanState(d.state);
      // The first few refusals also go next to the field they name (or atop the form).
      if (i < 3) place(dispatched.length > 1 ? `${d.vm}: ${why}` : why);
      items.push(h('li', { 'data-test': 'not-run', 'data-vm': d.vm },
        h('a', { href: vmHref(d.vm) }, d.vm), `: not run: ${why}`,
        d.id != null ? [' (', h('a', { href: execHref(d.id) }, `execution ${d.id}`), ')'] : null));
    });
    if (answer.skipped?.length) {
      items.push(h('li', { 'data-test': 'skipped' }, `Skipped once max errors was passed: ${answer.skipped.join(', ')}`));
    }
    fill(result,
      h('p', null, `Started ${accepted.length} of ${dispatched.length + (answer.skipped?.length ?? 0)}.`),
      items.length ? h('ul', { class: 'problems' }, items) : null);
    setStatus(`${command.name}: started on ${accepted.length} VM${accepted.length === 1 ? '' : 's'}.`);
    if (accepted.length) onStarted?.(accepted.map((d) => ({ ...d, command: command.name, args: lastArgs })));
  };

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (busy) return;
    const raw = clientChecksOff();
    clearMessages();
    if (!raw) {
      const bad = checked.filter((f) => f.check());
      if (bad.length) {
        bad[0].input.focus();
        setStatus(`Not run: ${bad.length} field${bad.length === 1 ? '' : 's'} to fix.`);
        return;
      }
    }
    lastArgs = params.map((f) => f.value(raw));
    const body = { target, command: command.name, args: lastArgs };
    const seconds = timeout.input.value;
    if (seconds !== '' && Number.isFinite(Number(seconds))) {
      const ms = Math.round(Number(seconds) * 1000);
      if (raw || ms !== command.timeout_ms) body.timeout_ms = ms;
    }
    for (const f of counters) if (f.input.value !== '') body[f.name] = Number(f.input.value);
    busy = true;
    runButton.disabled = true;
    fill(result, h('p', null, body.max_concurrency
      ? 'Dispatching… with a concurrency limit the daemon answers once the last VM has been dispatched.'
      : 'Dispatching…'));
    try {
      showResult(await api('/v1/exec', { method: 'POST', json: body }));
    } catch (e) {
      fill(result);
      place(e.message);
    } finally {
      busy = false;
      runButton.disabled = false;
    }
  });
  return form;
}

// ---------------------------------------------------------------------------------------
// Page: Instances (/console/)
// ---------------------------------------------------------------------------------------

/** Whether a VM matches a label filter (`k=v` exactly, or `k`: has the key). */
function labelMatches(vm, filter) {
  if (!filter) return true;
  const at = filter.indexOf('=');
  const labels = vm.labels ?? {};
  if (at < 0) return Object.hasOwn(labels, filter);
  return labels[filter.slice(0, at)] === filter.slice(at + 1);
}

/** The agent state of a VM as text, with its restarts and cut-offs. */
function vmStateCell(vm) {
  const restarts = vm.agent_restarts > 0
    ? h('span', { class: 'badge restarted', title: `The daemon saw the agent restart ${vm.agent_restarts} times` }, `restarted ${vm.agent_restarts}×`)
    : null;
  const cutoffs = vm.cutoffs > 0
    ? h('span', { class: 'badge cutoffs', title: vm.last_cutoff ? `Last: ${fmtTime(vm.last_cutoff.at_ms)}, ${vm.last_cutoff.budget}: ${vm.last_cutoff.detail}` : '' }, `cut off ${vm.cutoffs}×`)
    : null;
  return [h('span', { class: ['vm-state', stateClass(vm.state)] }, VM_STATES[vm.state] ?? humanState(vm.state)), ' ', restarts, ' ', cutoffs];
}

/** The heartbeat age: the last event's, plus the time since it came. */
function heartbeatText(vm, receivedAt) {
  if (vm.heartbeat_age_ms == null) return '—';
  return fmtSeconds(vm.heartbeat_age_ms + (performance.now() - receivedAt));
}

/** A row of the instances table, updated in place. */
function vmRow(vm, onSelect) {
  const box = h('input', { type: 'checkbox', 'aria-label': `Select ${vm.name}`, 'data-test': 'vm-select', on: { change: onSelect } });
  const cells = {
    labels: h('td'), channel: h('td'), state: h('td', { 'data-test': 'vm-state' }),
    heartbeat: h('td', { class: 'num', 'data-test': 'vm-heartbeat' }), version: h('td'), running: h('td', { class: 'num' }),
  };
  const tr = h('tr', { 'data-test': 'vm-row', 'data-vm': vm.name },
    h('td', null, box), h('th', { scope: 'row' }, h('a', { href: vmHref(vm.name) }, vm.name)),
    cells.labels, cells.channel, cells.state, cells.heartbeat, cells.version, cells.running);
  const row = { tr, box, vm, receivedAt: 0, labelsKey: null };
  row.update = (next) => {
    row.vm = next;
    row.receivedAt = performance.now();
    const key = JSON.stringify(next.labels ?? {});
    if (key !== row.labelsKey) {
      row.labelsKey = key;
      fill(cells.labels, labelChips(next.labels));
    }
    cells.channel.textContent = next.channel || '—';
    fill(cells.state, ...vmStateCell(next));
    cells.version.textContent = next.agent_software ?? '—';
    cells.running.textContent = String(next.running ?? 0);
    row.tick();
  };
  row.tick = () => { cells.heartbeat.textContent = heartbeatText(row.vm, row.receivedAt); };
  row.update(vm);
  return row;
}

async function instancesPage() {
  setTitle('Instances');
  const q = new URLSearchParams(location.search);
  const labelInput = h('input', { type: 'search', id: 'filter-label', 'data-test': 'filter-label', placeholder: 'role=web', autocomplete: 'off', spellcheck: 'false', value: q.get('label') ?? '', 'aria-describedby': 'filter-label-hint' });
  const stateSelect = h('select', { id: 'filter-state', 'data-test': 'filter-state', value: q.get('state') ?? '' },
    h('option', { value: '' }, 'Any state'),
    Object.entries(VM_STATES).map(([value, text]) => h('option', { value }, text)));
  const count = h('p', { class: 'count', 'data-test': 'vm-count', 'aria-live': 'polite' }, 'Loading…');
  const runSelected = h('button', { type: 'button', 'data-test': 'run-selected', disabled: true }, 'Run on selected');
  const runLabel = h('a', { class: 'button', 'data-test': 'run-label', href: '/console/run', hidden: true }, 'Run on label');
  const runAll = h('a', { class: 'button', 'data-test': 'run-all', href: '/console/run?all=1' }, 'Run on all');
  const selectAll = h('input', { type: 'checkbox', 'aria-label': 'Select every VM shown', 'data-test': 'select-all' });
  const tbody = h('tbody');
  const rows = new Map();

  fill(main,
    h('h1', null, 'Instances'),
    h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter VMs', on: { submit: (e) => e.preventDefault() } },
      h('div', { class: 'field' }, h('label', { for: 'filter-label' }, 'Label'), labelInput,
        h('p', { id: 'filter-label-hint', class: 'hint' }, 'key=value, or a key')),
      h('div', { class: 'field' }, h('label', { for: 'filter-state' }, 'Agent state'), stateSelect)),
    h('div', { class: 'actions' }, runSelected, runLabel, runAll, count),
    tableRegion('VMs', [h('th', { scope: 'col' }, selectAll), 'Name', 'Labels', 'Channel', 'Agent', 'Heartbeat', 'Version', 'Running'], tbody, { class: 'vms' }));

  const shownRows = () => [...rows.values()].filter((r) => !r.tr.hidden);
  const selection = () => {
    const chosen = shownRows().filter((r) => r.box.checked);
    runSelected.disabled = chosen.length === 0;
    runSelected.textContent = chosen.length ? `Run on selected (${chosen.length})` : 'Run on selected';
    const shown = shownRows();
    selectAll.checked = shown.length > 0 && chosen.length === shown.length;
    selectAll.indeterminate = chosen.length > 0 && chosen.length < shown.length;
    return chosen;
  };
  const empty = h('tr', null, h('td', { colspan: 8, class: 'muted' }, 'No VM is visible to your principal.'));
  const matches = (vm) => labelMatches(vm, labelInput.value.trim()) && (!stateSelect.value || vm.state === stateSelect.value);
  /** Shows the rows that pass the filters; updates the count and the run links. */
  const apply = () => {
    const label = labelInput.value.trim();
    for (const r of rows.values()) r.tr.hidden = !matches(r.vm);
    const shown = shownRows().length;
    count.textContent = `${rows.size} VM${rows.size === 1 ? '' : 's'}, ${shown} shown`;
    const [k, v] = label.split(/=(.*)/s);
    runLabel.hidden = !(k && v);
    runLabel.href = `/console/run?label=${enc(label)}`;
    runLabel.textContent = k && v ? `Run on label ${label}` : 'Run on label';
    selection();
  };
  /** The filters go into the address, so that a reload keeps them. */
  const filtered = () => {
    apply();
    history.replaceState(null, '', `/console/${queryString([['label', labelInput.value.trim()], ['state', stateSelect.value]])}`);
  };
  const upsert = (vm) => {
    const row = rows.get(vm.name);
    if (row) {
      row.update(vm);
    } else {
      const fresh = vmRow(vm, selection);
      rows.set(vm.name, fresh);
      empty.remove();
      tbody.append(fresh.tr);
    }
  };

  labelInput.addEventListener('input', filtered);
  stateSelect.addEventListener('change', filtered);
  selectAll.addEventListener('change', () => {
    for (const r of shownRows()) r.box.checked = selectAll.checked;
    selection();
  });
  runSelected.addEventListener('click', () => {
    const names = selection().map((r) => r.vm.name);
    if (names.length) location.assign(`/console/run?${names.map((n) => `vm=${enc(n)}`).join('&')}`);
  });

  let list;
  try {
    list = await api('/v1/vms');
  } catch (e) {
    fill(count, problem(`The VMs could not be listed: ${e.message}`));
    return;
  }
  for (const vm of list.vms ?? []) upsert(vm);
  if (!rows.size) tbody.append(empty);
  apply();
  // Live: a row changes in place; only a change of whether it passes the filters redraws more.
  followVms((vm) => {
    const row = rows.get(vm.name);
    const wasShown = row && !row.tr.hidden;
    upsert(vm);
    if (!row || wasShown !== matches(vm)) apply();
  });
  everySecond(() => rows.forEach((r) => r.tick()));
}

// ---------------------------------------------------------------------------------------
// Page: one VM (/console/vms/{vm})
// ---------------------------------------------------------------------------------------

/** The figures of GET /v1/vms/{vm}/metrics. */
function metricsFacts(m) {
  const load = (m.load_milli ?? []).map((v) => (v / 1000).toFixed(2)).join(' / ') || '—';
  const used = m.mem_total_kib ? m.mem_total_kib - m.mem_available_kib : null;
  const a = m.agent ?? {};
  return facts([
    ['Load (1 / 5 / 15 min)', load],
    ['Memory used / total', used == null ? '—' : `${fmtBytes(used * 1024)} / ${fmtBytes(m.mem_total_kib * 1024)}`],
    ['Processes', String(m.processes ?? '—')],
    ['Uptime', fmtSeconds(m.uptime_ms ?? 0)],
    ['Agent RSS', fmtBytes((m.agent_rss_kib ?? 0) * 1024)],
    ['Agent frames in / out', `${a.frames_in ?? 0} / ${a.frames_out ?? 0}`],
    ['Agent output sent', fmtBytes(a.output_bytes ?? 0)],
    ['Agent executions (running)', `${a.executions ?? 0} (${a.running ?? 0})`],
    ['Agent rejections', String(a.rejections ?? 0)],
    ['Channel resets', String(a.resets ?? 0)],
  ], { 'data-test': 'metrics' });
}

async function vmPage(name, who) {
  setTitle(name);
  // On a fleet's control plane, ping and metrics are the VM's host daemon's.
  const local = !who?.fleet;
  const head = h('div', { class: 'vm-facts' }, h('p', null, 'Loading…'));
  const commands = h('div', { class: 'commands' }, h('p', null, 'Loading the commands…'));
  const metricsOut = h('div', { class: 'metrics', 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'Not fetched yet: press Refresh.'));
  const pingOut = h('output', { class: 'ping', 'data-test': 'ping-result', 'aria-live': 'polite' });
  const listedAge = h('span', { class: 'muted', 'data-test': 'commands-age' });

  const refresh = h('button', { type: 'button', 'data-test': 'metrics-refresh' }, 'Refresh');
  const ping = h('button', { type: 'button', 'data-test': 'ping' }, 'Ping');
  fill(main,
    h('h1', null, name),
    head,
    h('p', { class: 'actions' }, local ? [ping, ' ', pingOut, ' '] : null, h('a', { class: 'button', href: `/console/run?vm=${enc(name)}` }, 'Run page'),
      ' ', h('a', { class: 'button', href: `/console/executions?vm=${enc(name)}` }, 'History')),
    h('section', { 'aria-labelledby': 'commands-title' }, h('h2', { id: 'commands-title' }, 'Commands ', listedAge), commands),
    local
      ? h('section', { 'aria-labelledby': 'metrics-title' }, h('h2', { id: 'metrics-title' }, 'Metrics'), h('p', null, refresh), metricsOut)
      : h('p', { class: 'muted', 'data-test': 'fleet-note' }, `Ping and metrics are answered by the VM's host: ask its daemon (portless ping ${name.split('/').pop()} on ${name.split('/')[0]}).`));

  ping.addEventListener('click', async () => {
    ping.disabled = true;
    pingOut.textContent = 'Pinging…';
    try {
      const r = await api(`/v1/vms/${enc(name)}/ping`, { method: 'POST' });
      pingOut.textContent = `Round trip ${r.rtt_us < 1000 ? `${r.rtt_us} µs` : `${(r.rtt_us / 1000).toFixed(1)} ms`}`;
    } catch (e) {
      pingOut.textContent = `Ping failed: ${e.message}`;
    } finally {
      ping.disabled = false;
    }
  });
  refresh.addEventListener('click', async () => {
    refresh.disabled = true;
    try {
      const r = await api(`/v1/vms/${enc(name)}/metrics`);
      fill(metricsOut, metricsFacts(r.metrics ?? {}), h('p', { class: 'muted' }, `Fetched ${fmtTime(Date.now())}.`));
    } catch (e) {
      fill(metricsOut, problem(`The metrics could not be read: ${e.message}`));
    } finally {
      refresh.disabled = false;
    }
  });

  let vm;
  try {
    vm = (await api('/v1/vms')).vms?.find((v) => v.name === name);
  } catch (e) {
    fill(head, problem(`The VM could not be read: ${e.message}`));
    return;
  }
  if (!vm) {
    fill(main, h('h1', null, 'No such VM'), h('p', null, `No VM named “${name}” is visible to your principal. `, h('a', { href: '/console/' }, 'See the instances.')));
    return;
  }

  let receivedAt = performance.now();
  const heartbeat = h('span', { 'data-test': 'vm-heartbeat' });
  const drawHead = () => {
    fill(head, facts([
      ['Agent', h('span', { 'data-test': 'vm-state' }, ...vmStateCell(vm))],
      ['Labels', labelChips(vm.labels)],
      ['Channel', vm.channel || '—'],
      ['Agent version', vm.agent_software ?? '—'],
      ['Config revision', vm.config_revision != null ? String(vm.config_revision) : '—'],
      ['Agent generation', vm.agent_generation != null ? String(vm.agent_generation) : '—'],
      ['Heartbeat age', heartbeat],
      ['Running', String(vm.running ?? 0)],
      ['Cut-offs', vm.cutoffs ? `${vm.cutoffs}; last ${fmtTime(vm.last_cutoff?.at_ms)} (${vm.last_cutoff?.budget ?? '?'}): ${vm.last_cutoff?.detail ?? ''}` : 'none'],
      ['Protocol violations', String(vm.violations ?? 0)],
    ]));
    heartbeat.textContent = heartbeatText(vm, receivedAt);
  };
  drawHead();
  followVms((next) => {
    if (next.name !== name) return;
    vm = next;
    receivedAt = performance.now();
    drawHead();
  });

  let list;
  try {
    list = await api(`/v1/vms/${enc(name)}/commands`);
  } catch (e) {
    fill(commands, problem(`The commands could not be listed: ${e.message}`));
    return;
  }
  const listedAt = performance.now() - (list.age_ms ?? 0);
  const age = () => { listedAge.textContent = `(listed ${fmtSeconds(performance.now() - listedAt)} ago, revision ${list.config_revision})`; };
  age();
  everySecond(() => {
    heartbeat.textContent = heartbeatText(vm, receivedAt);
    age();
  });
  if (!list.commands?.length) {
    fill(commands, h('p', { class: 'muted' }, 'This VM’s allow-list has no commands.'));
    return;
  }
  fill(commands, ...list.commands.map((command) => {
    const slot = h('div', { class: 'watch-slot' });
    let watch = null;
    const form = commandForm({
      command, target: name, targetText: name,
      onStarted: (accepted) => {
        watch?.dispose();
        watch = new Watch({ single: accepted.length === 1 });
        watch.add(accepted);
        fill(slot, watch.el, h('p', null, h('a', { href: watchHref(accepted.map((d) => d.id)) }, 'Watch on its own page')));
        watch.start();
      },
    });
    return h('div', { class: 'command' }, form, slot);
  }));
}

// ---------------------------------------------------------------------------------------
// Page: Run (/console/run): fan-out to a VM list, a label or all VMs
// ---------------------------------------------------------------------------------------

/** The run page's target from its query: {kind, vms?, label?} or null. */
function runTarget(q) {
  if (q.get('all') === '1') return { kind: 'all' };
  const label = q.get('label');
  if (label) return { kind: 'label', label };
  const vms = [...new Set(q.getAll('vm').filter(Boolean))];
  return vms.length ? { kind: 'vms', vms } : null;
}

/** The chooser of a target when the query names none. */
function targetChooser(vms, command) {
  return h('form', { class: 'card', method: 'get', action: '/console/run', 'aria-labelledby': 'choose-title' },
    h('h2', { id: 'choose-title' }, 'Choose where to run'),
    command ? h('input', { type: 'hidden', name: 'command', value: command }) : null,
    h('fieldset', null, h('legend', null, 'VMs'),
      vms.length ? h('ul', { class: 'checks' }, vms.map((vm) => {
        const id = nextId('vm');
        return h('li', null, h('input', { type: 'checkbox', id, name: 'vm', value: vm.name }), h('label', { for: id }, vm.name, ' ', h('span', { class: 'muted' }, VM_STATES[vm.state] ?? humanState(vm.state))));
      })) : h('p', { class: 'muted' }, 'No VM is visible to your principal.')),
    h('div', { class: 'field' }, h('label', { for: 'choose-label' }, 'Or every VM with label'),
      h('input', { id: 'choose-label', name: 'label', placeholder: 'role=web', autocomplete: 'off', spellcheck: 'false' })),
    h('p', { class: 'check' }, h('input', { type: 'checkbox', id: 'choose-all', name: 'all', value: '1' }), h('label', { for: 'choose-all' }, 'Or all VMs')),
    h('p', null, h('button', { type: 'submit', class: 'primary' }, 'Choose')));
}

async function runPage() {
  setTitle('Run');
  const q = new URLSearchParams(location.search);
  const target = runTarget(q);
  const wanted = q.get('command') ?? '';
  fill(main, h('h1', null, 'Run a command'), h('p', null, 'Loading…'));

  let vms;
  try {
    vms = (await api('/v1/vms')).vms ?? [];
  } catch (e) {
    fill(main, h('h1', null, 'Run a command'), problem(`The VMs could not be listed: ${e.message}`));
    return;
  }
  if (!target) {
    fill(main, h('h1', null, 'Run a command'), targetChooser(vms, wanted));
    return;
  }

  // The VMs of the target, as far as this principal sees them, and the daemon's target string.
  let chosen;
  let targetString;
  let targetText;
  const notes = [];
  if (target.kind === 'all') {
    chosen = vms;
    targetString = '*';
    targetText = 'all VMs';
  } else if (target.kind === 'label') {
    chosen = vms.filter((vm) => labelMatches(vm, target.label));
    targetString = target.label;
    targetText = `label ${target.label}`;
    if (!target.label.includes('=')) notes.push('A label target is key=value.');
  } else {
    chosen = vms.filter((vm) => target.vms.includes(vm.name));
    const missing = target.vms.filter((n) => !chosen.some((vm) => vm.name === n));
    if (missing.length) notes.push(`Not visible to you, left out: ${missing.join(', ')}.`);
    targetString = chosen.map((vm) => vm.name).join(',');
    targetText = chosen.length === 1 ? chosen[0].name : `${chosen.length} VMs`;
  }

  const targetBox = h('section', { class: 'card target', 'aria-labelledby': 'target-title', 'data-test': 'target' },
    h('h2', { id: 'target-title' }, target.kind === 'all' ? 'Target: all VMs' : target.kind === 'label' ? `Target: label ${target.label}` : 'Target: these VMs'),
    chosen.length ? h('ul', { class: 'chips' }, chosen.map((vm) => h('li', { class: 'chip' }, h('a', { href: vmHref(vm.name) }, vm.name)))) : null,
    notes.map((n) => h('p', { class: 'warning' }, n)),
    h('p', null, h('a', { href: `/console/run${queryString([['command', wanted]])}` }, 'Choose another target')));
  const commandArea = h('div', null, h('p', null, `Listing the commands of ${chosen.length} VM${chosen.length === 1 ? '' : 's'}…`));
  const watchSlot = h('div', { class: 'watch-slot' });
  fill(main, h('h1', null, 'Run a command'), targetBox, commandArea, watchSlot);
  if (!chosen.length) {
    fill(commandArea, problem('No VM you can see is in this target.'));
    return;
  }

  // The commands present on every target VM (that answered), with the first VM's parameters.
  const lists = await settleAll(chosen, PARALLEL, (vm) => api(`/v1/vms/${enc(vm.name)}/commands`));
  const answered = [];
  const failures = [];
  lists.forEach((r, i) => (r.ok ? answered.push(r.value) : failures.push(`${chosen[i].name}: ${r.error.message}`)));
  if (!answered.length) {
    fill(commandArea, problem(`No target VM listed its commands. ${failures.join('; ')}`));
    return;
  }
  const common = answered[0].commands.filter((c) => answered.every((l) => l.commands.some((x) => x.name === c.name)));
  const selectId = 'run-command';
  const select = h('select', { id: selectId, 'data-test': 'command-select', value: common.some((c) => c.name === wanted) ? wanted : '' },
    h('option', { value: '' }, common.length ? 'Choose a command' : 'No command is on every target VM'),
    common.map((c) => h('option', { value: c.name }, c.name)));
  const formSlot = h('div');
  fill(commandArea,
    failures.length ? h('p', { class: 'warning' }, `Commands not listed (left out of the choice): ${failures.join('; ')}`) : null,
    h('div', { class: 'field single' }, h('label', { for: selectId }, 'Command'), select,
      h('p', { class: 'hint' }, `Commands on all ${answered.length} VMs that listed theirs.`)),
    formSlot);

  let watch = null;
  const drawForm = () => {
    const command = common.find((c) => c.name === select.value);
    history.replaceState(null, '', `/console/run${queryString([...[...q].filter(([k]) => k !== 'command'), ['command', select.value]])}`);
    if (!command) {
      fill(formSlot);
      return;
    }
    const same = JSON.stringify([command.params, command.timeout_ms, command.max_output]);
    const differ = answered.filter((l) => {
      const c = l.commands.find((x) => x.name === command.name);
      return JSON.stringify([c.params, c.timeout_ms, c.max_output]) !== same;
    }).map((l) => l.vm);
    fill(formSlot,
      differ.length ? h('p', { class: 'warning' }, `Defined differently on ${differ.join(', ')}: the form follows ${answered[0].vm}’s definition; each guest checks its own.`) : null,
      commandForm({
        command, target: targetString, targetText, fanOut: true, heading: 'h2',
        onStarted: (accepted) => {
          watch?.dispose();
          watch = new Watch();
          watch.add(accepted);
          fill(watchSlot, h('h2', null, 'Output'), watch.el);
          watch.start();
          // A reload resumes watching these executions.
          history.replaceState(null, '', watchHref(accepted.map((d) => d.id)));
        },
      }));
  };
  select.addEventListener('change', drawForm);
  if (select.value) drawForm();
}

// ---------------------------------------------------------------------------------------
// Page: Watch (/console/watch?execution=1&execution=2...)
// ---------------------------------------------------------------------------------------

async function watchPage() {
  const ids = [...new Set(new URLSearchParams(location.search).getAll('execution'))].filter((id) => /^\d+$/.test(id));
  setTitle('Watch');
  if (!ids.length) {
    fill(main, h('h1', null, 'Watch'), h('p', null, 'No execution to watch. ', h('a', { href: '/console/run' }, 'Run a command'), ' or pick one from the ', h('a', { href: '/console/executions' }, 'history'), '.'));
    return;
  }
  fill(main, h('h1', null, `Watching ${ids.length} execution${ids.length === 1 ? '' : 's'}`), h('p', null, 'Loading…'));
  // Each record first: the panes know their VM, and one unreadable id does not refuse the
  // stream of all the others.
  const records = await settleAll(ids, PARALLEL, (id) => api(`/v1/executions/${enc(id)}`));
  const failed = records.map((r, i) => (r.ok ? null : h('li', null, `Execution ${ids[i]}: ${r.error.message}`))).filter(Boolean);
  const watch = new Watch({ single: ids.length === 1 });
  watch.add(records.filter((r) => r.ok).map((r) => r.value));
  fill(main,
    h('h1', null, `Watching ${ids.length} execution${ids.length === 1 ? '' : 's'}`),
    failed.length ? h('ul', { class: 'problems', role: 'alert' }, failed) : null,
    watch.el);
  watch.start();
}

// ---------------------------------------------------------------------------------------
// Page: History (/console/executions)
// ---------------------------------------------------------------------------------------

async function historyPage() {
  setTitle('History');
  const q = new URLSearchParams(location.search);
  const get = (k) => q.get(k) ?? '';
  const vmSelect = h('select', { id: 'h-vm', name: 'vm' }, h('option', { value: '' }, 'Any VM'));
  const tbody = h('tbody');
  const more = h('p', { class: 'pager' });
  const field = (id, label, input) => h('div', { class: 'field' }, h('label', { for: id }, label), input);
  fill(main,
    h('h1', null, 'History'),
    h('form', { class: 'filters', method: 'get', action: '/console/executions', role: 'search', 'aria-label': 'Filter executions' },
      field('h-vm', 'VM', vmSelect),
      field('h-command', 'Command', h('input', { id: 'h-command', name: 'command', value: get('command'), autocomplete: 'off', spellcheck: 'false' })),
      field('h-state', 'State', h('select', { id: 'h-state', name: 'state', value: get('state') },
        h('option', { value: '' }, 'Any state'), EXEC_STATES.map((s) => h('option', { value: s }, humanState(s))))),
      field('h-principal', 'Principal', h('input', { id: 'h-principal', name: 'principal', value: get('principal'), autocomplete: 'off', spellcheck: 'false' })),
      field('h-from', 'From', h('input', { type: 'datetime-local', id: 'h-from', name: 'from', value: get('from') })),
      field('h-to', 'To', h('input', { type: 'datetime-local', id: 'h-to', name: 'to', value: get('to') })),
      h('div', { class: 'field submit' }, h('button', { type: 'submit', class: 'primary' }, 'Filter'), ' ', h('a', { href: '/console/executions' }, 'Clear'))),
    tableRegion('Executions, newest first', ['Id', 'VM', 'Command', 'Arguments', 'Principal', 'State', 'Requested', 'Duration', 'Exit'], tbody, { class: 'executions' }),
    more);

  api('/v1/vms').then((r) => {
    for (const vm of r.vms ?? []) vmSelect.append(h('option', { value: vm.name }, vm.name));
    vmSelect.value = get('vm');
    // A VM named in the query but not listed stays chosen.
    if (get('vm') && vmSelect.value !== get('vm')) vmSelect.append(h('option', { value: get('vm'), selected: true }, get('vm')));
  }, () => {});

  const apiQuery = queryString([
    ['vm', get('vm')], ['state', get('state')], ['command', get('command')], ['principal', get('principal')],
    ['since_ms', localInputToMs(get('from'))], ['until_ms', localInputToMs(get('to'))],
    ['before', get('before')], ['limit', HISTORY_PAGE],
  ]);
  tbody.append(h('tr', null, h('td', { colspan: 9 }, 'Loading…')));
  let list;
  try {
    list = (await api(`/v1/executions${apiQuery}`)).executions ?? [];
  } catch (e) {
    fill(tbody, h('tr', null, h('td', { colspan: 9 }, problem(e.message))));
    return;
  }
  fill(tbody, ...list.map((r) => h('tr', { 'data-test': 'history-row', 'data-execution': r.id },
    h('th', { scope: 'row' }, h('a', { href: execHref(r.id) }, String(r.id))),
    h('td', null, h('a', { href: vmHref(r.vm) }, r.vm)),
    h('td', null, h('code', null, r.command)),
    h('td', { class: 'args' }, fmtArgs(r.args)),
    h('td', null, r.principal || '—'),
    h('td', null, execBadge(r.state)),
    h('td', { class: 'time' }, fmtTime(r.requested_at_ms)),
    h('td', { class: 'num' }, fmtDuration(r.duration_ms)),
    h('td', null, fmtExit(r) || '—'))));
  if (!list.length) tbody.append(h('tr', null, h('td', { colspan: 9, class: 'muted' }, 'No execution matches.')));
  const pairs = [...q].filter(([k]) => k !== 'before');
  fill(more,
    get('before') ? h('a', { class: 'button', href: `/console/executions${queryString(pairs)}`, 'data-test': 'newest' }, 'Newest') : null, ' ',
    list.length === HISTORY_PAGE
      ? h('a', { class: 'button', href: `/console/executions${queryString([...pairs, ['before', list[list.length - 1].id]])}`, 'data-test': 'older' }, 'Older')
      : null);
}

// ---------------------------------------------------------------------------------------
// Page: one execution (/console/executions/{id})
// ---------------------------------------------------------------------------------------

/** The facts of an execution record. */
function executionFacts(r) {
  const totals = (t) => t ? `${fmtBytes(t.stored_len)} kept of ${fmtBytes(t.total_len)}${t.truncated ? ' (truncated at the cap)' : ''}` : '—';
  return facts([
    ['VM', h('a', { href: vmHref(r.vm) }, r.vm)],
    ['Command', h('code', null, r.command)],
    ['Arguments', r.args?.length ? h('ol', { class: 'args' }, r.args.map((a) => h('li', null, h('code', null, a)))) : 'none'],
    ['Principal', r.principal || '—'],
    ['State', execBadge(r.state, { 'data-test': 'execution-state' })],
    ['Requested', fmtTime(r.requested_at_ms)],
    ['Started', fmtTime(r.started_at_ms)],
    ['Finished', fmtTime(r.finished_at_ms)],
    ['Duration', fmtDuration(r.duration_ms)],
    ['Exit code', r.exit_code != null ? String(r.exit_code) : '—'],
    ['Signal', r.signal != null ? String(r.signal) : '—'],
    ['Detail', r.detail ?? '—'],
    ['Agent execution id', r.agent_generation != null ? `${r.agent_generation}:${r.agent_counter}` : '—'],
    ['Output cap', `${fmtBytes(r.output_cap)} per stream`],
    ['stdout', totals(r.stdout)],
    ['stderr', totals(r.stderr)],
  ], { 'data-test': 'execution-facts' });
}

/** One stream's kept output, read in 64 KiB pages. */
function outputPager(id, stream, isDone) {
  const pre = h('pre', { class: 'output paged', 'data-test': 'output', 'data-stream': stream, tabindex: 0, 'aria-label': `${stream} of execution ${id}` });
  const next = h('button', { type: 'button', 'data-test': 'next-page', 'data-stream': stream }, 'Next page');
  const info = h('p', { class: 'muted', 'aria-live': 'polite' });
  const decoder = new TextDecoder('utf-8');
  let offset = 0;
  const load = async () => {
    next.disabled = true;
    try {
      const res = await api(`${rawHref(id, stream)}&offset=${offset}&limit=${OUTPUT_PAGE}`, { raw: true });
      const bytes = new Uint8Array(await res.arrayBuffer());
      const stored = Number(res.headers.get('x-portless-stored-len') ?? 0);
      const total = Number(res.headers.get('x-portless-total-len') ?? 0);
      offset += bytes.length;
      const done = offset >= stored && isDone();
      const text = decoder.decode(bytes, { stream: !done });
      if (text) pre.append(document.createTextNode(text));
      info.textContent = `${fmtBytes(offset)} of ${fmtBytes(stored)} kept shown${total > stored ? ` (${fmtBytes(total)} produced)` : ''}.`;
      next.disabled = done;
      next.textContent = done ? 'End of kept output' : offset >= stored ? 'Check for more' : 'Next page';
    } catch (e) {
      info.textContent = `Could not read the output: ${e.message}`;
      next.disabled = false;
    }
  };
  next.addEventListener('click', load);
  load();
  return h('section', { class: 'stream', 'aria-labelledby': `${stream}-title` },
    h('h3', { id: `${stream}-title` }, stream, ' ', h('span', { class: 'muted' }, rawLink(id, stream, 'download raw'))),
    pre, h('p', { class: 'actions' }, next, ' ', info));
}

async function executionPage(id) {
  setTitle(`Execution ${id}`);
  if (!/^\d+$/.test(id)) {
    notFoundPage();
    return;
  }
  fill(main, h('h1', null, `Execution ${id}`), h('p', null, 'Loading…'));
  let rec;
  try {
    rec = await api(`/v1/executions/${enc(id)}`);
  } catch (e) {
    fill(main, h('h1', null, `Execution ${id}`), problem(e.message));
    return;
  }
  const factsSlot = h('div', null, executionFacts(rec));
  let done = isFinal(rec.state);
  const parts = [h('h1', null, `Execution ${id}`), factsSlot];
  if (!done) {
    const watch = new Watch({
      single: true,
      onEnd: (end) => {
        done = true;
        fill(factsSlot, executionFacts(end));
      },
    });
    watch.add([rec]);
    parts.push(h('section', { 'aria-labelledby': 'live-title' }, h('h2', { id: 'live-title' }, 'Live'), watch.el));
    watch.start();
  }
  parts.push(h('section', { 'aria-labelledby': 'output-title' }, h('h2', { id: 'output-title' }, 'Kept output'),
    h('div', { class: 'streams' }, outputPager(id, 'stdout', () => done), outputPager(id, 'stderr', () => done))));
  fill(main, ...parts);
}

// ---------------------------------------------------------------------------------------
// Page: Push (/console/push)
// ---------------------------------------------------------------------------------------

/** A file name as a guest program name: [A-Za-z0-9._-], not starting with a dot. */
function programName(fileName) {
  return fileName.replace(/[^A-Za-z0-9._-]/g, '_').replace(/^\.+/, '').slice(0, 255) || 'program';
}

/** Sends a program to one VM with XMLHttpRequest (for upload progress). */
function pushTo(vm, file, query, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', `/v1/vms/${enc(vm)}/push${query}`);
    xhr.setRequestHeader('X-CSRF-Token', CSRF);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.upload.addEventListener('progress', (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size));
    xhr.upload.addEventListener('load', () => onProgress(null));
    xhr.addEventListener('load', () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // not JSON
      }
      if (xhr.status >= 200 && xhr.status < 300 && body) {
        resolve(body);
        return;
      }
      const message = body?.error ?? (xhr.responseText.trim().slice(0, 500) || `${xhr.status} ${xhr.statusText}`);
      if (isSessionEnd(xhr.status, message)) sessionEnded();
      reject(new ApiError(xhr.status, message));
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'The daemon could not be reached.')));
    xhr.send(file);
  });
}

async function pushPage(who) {
  setTitle('Push');
  if (who && !who.rights?.push) {
    fill(main, h('h1', null, 'Push a program'), h('p', { class: 'problem', 'data-test': 'forbidden' }, 'Your principal may not push programs.'));
    return;
  }
  const file = h('input', { type: 'file', id: 'push-file', 'data-test': 'push-file', required: true, 'aria-describedby': 'push-file-info' });
  const size = h('span', { 'data-test': 'push-size' }, '—');
  const sha = h('output', { 'data-test': 'push-sha256', class: 'hash' }, '—');
  const name = h('input', { id: 'push-name', name: 'name', required: true, autocomplete: 'off', spellcheck: 'false', pattern: '[A-Za-z0-9._\\-]+', 'aria-describedby': 'push-name-hint push-name-error' });
  const nameError = h('p', { id: 'push-name-error', class: 'field-error', 'aria-live': 'polite' });
  const store = h('input', { type: 'radio', id: 'push-store', name: 'mode', value: 'store', checked: true, 'data-test': 'push-store' });
  const run = h('input', { type: 'radio', id: 'push-run', name: 'mode', value: 'run', 'data-test': 'push-run' });
  const timeout = h('input', { type: 'number', id: 'push-timeout', name: 'timeout', min: 0.001, step: 'any', disabled: true, inputmode: 'decimal', 'aria-describedby': 'push-timeout-hint' });
  const vmList = h('ul', { class: 'checks' }, h('li', null, 'Loading…'));
  const go = h('button', { type: 'submit', class: 'primary', 'data-test': 'push-go', disabled: true }, 'Push');
  const formError = h('p', { class: 'problem', role: 'alert', hidden: true });
  const results = h('tbody');
  const resultRegion = tableRegion('Push results', ['VM', 'Upload', 'Outcome', 'Guest SHA-256', 'Match', 'Error'], results, { class: 'push-results' });
  resultRegion.hidden = true;
  const watchSlot = h('div', { class: 'watch-slot' });
  const form = h('form', { class: 'card', novalidate: true, 'aria-labelledby': 'push-title' },
    h('h2', { id: 'push-title' }, 'Program'),
    formError,
    h('div', { class: 'field' }, h('label', { for: 'push-file' }, 'File'), file,
      h('p', { id: 'push-file-info', class: 'hint' }, 'Size ', size, ', SHA-256 ', sha)),
    h('div', { class: 'field' }, h('label', { for: 'push-name' }, 'Name in the guest'), name,
      h('p', { id: 'push-name-hint', class: 'hint' }, 'A file name of A-Z a-z 0-9 . _ -, not starting with a dot.'), nameError),
    h('fieldset', null, h('legend', null, 'VMs'), vmList),
    h('fieldset', null, h('legend', null, 'Then'),
      h('p', { class: 'check' }, store, h('label', { for: 'push-store' }, 'Store it')),
      h('p', { class: 'check' }, run, h('label', { for: 'push-run' }, 'Store it and run it'))),
    h('div', { class: 'field' }, h('label', { for: 'push-timeout' }, 'Timeout of the run (seconds)'), timeout,
      h('p', { id: 'push-timeout-hint', class: 'hint' }, 'Empty for the guest’s push timeout.')),
    h('p', { class: 'actions' }, go));
  fill(main, h('h1', null, 'Push a program'), form, resultRegion, watchSlot);

  let hash = null;
  let hashing = 0;
  const ready = () => { go.disabled = !(file.files?.length && hash); };
  const mode = () => { timeout.disabled = !run.checked; };
  store.addEventListener('change', mode);
  run.addEventListener('change', mode);
  file.addEventListener('change', async () => {
    const f = file.files?.[0];
    hash = null;
    ready();
    if (!f) {
      size.textContent = '—';
      sha.textContent = '—';
      return;
    }
    size.textContent = fmtBytes(f.size);
    if (!name.value || name.dataset.auto === '1') {
      name.value = programName(f.name);
      name.dataset.auto = '1';
    }
    if (f.size > MAX_PUSH_BYTES) {
      sha.textContent = `too large: the daemon takes at most ${fmtBytes(MAX_PUSH_BYTES)}`;
      return;
    }
    const token = ++hashing;
    sha.textContent = 'computing…';
    try {
      const hex = await sha256Hex(f);
      if (token !== hashing) return;
      hash = hex;
      sha.textContent = hex;
    } catch (e) {
      if (token === hashing) sha.textContent = `could not be computed: ${e.message}`;
    }
    ready();
  });
  name.addEventListener('input', () => { name.dataset.auto = ''; nameError.textContent = ''; name.removeAttribute('aria-invalid'); });

  try {
    const vms = (await api('/v1/vms')).vms ?? [];
    fill(vmList, ...(vms.length ? vms.map((vm) => {
      const id = nextId('push-vm');
      return h('li', null, h('input', { type: 'checkbox', id, value: vm.name, 'data-test': 'push-vm' }),
        h('label', { for: id }, vm.name, ' ', h('span', { class: 'muted' }, VM_STATES[vm.state] ?? humanState(vm.state))));
    }) : [h('li', { class: 'muted' }, 'No VM is visible to your principal.')]));
  } catch (e) {
    fill(vmList, h('li', null, problem(`The VMs could not be listed: ${e.message}`)));
  }

  let watch = null;
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const f = file.files?.[0];
    const targets = [...vmList.querySelectorAll('input[type=checkbox]:checked')].map((b) => b.value);
    const raw = clientChecksOff();
    formError.hidden = true;
    if (!raw && !/^[A-Za-z0-9_-][A-Za-z0-9._-]*$/.test(name.value)) {
      nameError.textContent = 'A file name of A-Z a-z 0-9 . _ -, not starting with a dot.';
      name.setAttribute('aria-invalid', 'true');
      name.focus();
      return;
    }
    const seconds = timeout.value;
    const bad = !f ? 'Choose a file.' : !targets.length ? 'Choose at least one VM.'
      : (!raw && run.checked && seconds !== '' && !(Number(seconds) > 0)) ? 'The timeout is a number of seconds above 0.' : '';
    if (bad) {
      formError.textContent = bad;
      formError.hidden = false;
      return;
    }
    const query = queryString([['name', name.value], ['run', run.checked ? 'true' : 'false'],
      ['timeout_ms', run.checked && seconds !== '' ? Math.round(Number(seconds) * 1000) : null]]);
    const local = hash;
    go.disabled = true;
    watch?.dispose();
    watch = null;
    resultRegion.hidden = false;
    fill(results);
    setStatus(`Pushing ${f.name} to ${targets.length} VM${targets.length === 1 ? '' : 's'}…`, { sticky: true });

    const started = [];
    await settleAll(targets, PARALLEL_PUSHES, async (vm) => {
      const progress = h('progress', { max: 100, value: 0, 'aria-label': `Upload to ${vm}` });
      const cells = { outcome: h('td', { 'data-test': 'push-outcome' }, 'sending'), sha: h('td', { class: 'hash' }), match: h('td', { 'data-test': 'push-match' }), error: h('td') };
      results.append(h('tr', { 'data-test': 'push-row', 'data-vm': vm }, h('th', { scope: 'row' }, vm), h('td', null, progress), cells.outcome, cells.sha, cells.match, cells.error));
      try {
        const answer = await pushTo(vm, f, query, (loaded, total) => {
          if (loaded == null) {
            progress.value = 100;
            cells.outcome.textContent = 'waiting for the guest';
          } else if (total) {
            progress.value = Math.round((loaded / total) * 100);
          }
        });
        progress.value = 100;
        cells.outcome.textContent = answer.outcome ?? '—';
        cells.sha.textContent = answer.sha256 ?? '';
        const same = answer.sha256 && answer.sha256.toLowerCase() === local;
        fill(cells.match, answer.sha256 ? (same ? h('span', { class: 'ok' }, '✓ ', srOnly('matches')) : h('span', { class: 'bad' }, '✗ ', srOnly('differs'))) : '—');
        cells.error.textContent = answer.error ?? '';
        if (answer.execution != null) started.push({ id: answer.execution, vm, command: `push:${answer.name ?? name.value}`, args: [] });
      } catch (e) {
        cells.outcome.textContent = 'failed';
        cells.error.textContent = e.message;
      }
    });
    setStatus(`Push done: ${targets.length} VM${targets.length === 1 ? '' : 's'}.`);
    ready();
    if (started.length) {
      watch = new Watch({ single: started.length === 1 });
      watch.add(started);
      fill(watchSlot, h('h2', null, 'Runs'), watch.el);
      watch.start();
    }
  });
}

// ---------------------------------------------------------------------------------------
// Page: Audit (/console/audit)
// ---------------------------------------------------------------------------------------

/** The notice of a principal without the audit right. */
function auditForbidden(detail) {
  fill(main, h('h1', null, 'Audit log'),
    h('p', { class: 'problem', 'data-test': 'forbidden' }, 'Your principal may not read the audit log.'),
    detail ? h('p', { class: 'muted' }, detail) : null);
}

async function auditPage(who) {
  setTitle('Audit');
  // Known from whoami: no request that is bound to be refused (and audited as denied).
  if (who && !who.rights?.audit) {
    auditForbidden();
    return;
  }
  const q = new URLSearchParams(location.search);
  const get = (k) => q.get(k) ?? '';
  const field = (id, label, input) => h('div', { class: 'field' }, h('label', { for: id }, label), input);
  const listId = nextId('actions');
  const tbody = h('tbody');
  const region = tableRegion('Audit log', ['Time', 'Principal', 'Caller', 'Action', 'Target', 'Allowed', 'Reason', 'Count'], tbody, { class: 'audit' });
  const limit = get('limit') || '200';
  fill(main,
    h('h1', null, 'Audit log'),
    h('form', { class: 'filters', method: 'get', action: '/console/audit', role: 'search', 'aria-label': 'Filter the audit log' },
      field('a-principal', 'Principal', h('input', { id: 'a-principal', name: 'principal', value: get('principal'), autocomplete: 'off', spellcheck: 'false' })),
      field('a-action', 'Action', h('input', { id: 'a-action', name: 'action', value: get('action'), list: listId, autocomplete: 'off', spellcheck: 'false' })),
      h('datalist', { id: listId }, AUDIT_ACTIONS.map((a) => h('option', { value: a }))),
      field('a-allowed', 'Allowed', h('select', { id: 'a-allowed', name: 'allowed', value: get('allowed') },
        h('option', { value: '' }, 'Allowed and denied'), h('option', { value: 'true' }, 'Allowed only'), h('option', { value: 'false' }, 'Denied only'))),
      field('a-since', 'Since', h('input', { type: 'datetime-local', id: 'a-since', name: 'since', value: get('since') })),
      field('a-order', 'Order', h('select', { id: 'a-order', name: 'order', value: get('order') || 'newest' },
        h('option', { value: 'newest' }, 'Newest first'), h('option', { value: 'oldest' }, 'Oldest first'))),
      field('a-limit', 'Limit', h('input', { type: 'number', id: 'a-limit', name: 'limit', min: 1, max: 10000, step: 1, value: limit, inputmode: 'numeric' })),
      h('div', { class: 'field submit' }, h('button', { type: 'submit', class: 'primary' }, 'Filter'), ' ', h('a', { href: '/console/audit' }, 'Clear'))),
    region);
  tbody.append(h('tr', null, h('td', { colspan: 8 }, 'Loading…')));
  let entries;
  try {
    entries = (await api(`/v1/audit${queryString([
      ['principal', get('principal')], ['action', get('action')], ['allowed', get('allowed')],
      ['since_ms', localInputToMs(get('since'))], ['limit', limit], ['order', get('order') || 'newest'],
    ])}`)).entries ?? [];
  } catch (e) {
    if (e.status === 403 && !sessionGone) {
      auditForbidden(e.message);
    } else {
      fill(tbody, h('tr', null, h('td', { colspan: 8 }, problem(e.message))));
    }
    return;
  }
  fill(tbody, ...entries.map((a) => h('tr', { 'data-test': 'audit-row', class: a.allowed ? null : 'denied' },
    h('td', { class: 'time' }, fmtTime(a.at_ms)),
    h('td', null, a.principal ?? h('span', { class: 'muted' }, 'unidentified')),
    h('td', null, a.caller),
    h('td', null, h('code', null, a.action)),
    h('td', null, a.target ?? '—'),
    h('td', null, a.allowed ? h('span', { class: 'ok' }, '✓', srOnly(' allowed')) : h('span', { class: 'bad' }, 'denied')),
    h('td', { class: 'reason' }, a.reason ?? ''),
    h('td', { class: 'num' }, String(a.count ?? 1)))));
  if (!entries.length) tbody.append(h('tr', null, h('td', { colspan: 8, class: 'muted' }, 'No entry matches.')));
}

// ---------------------------------------------------------------------------------------
// Page: anything else
// ---------------------------------------------------------------------------------------

function notFoundPage() {
  setTitle('No such page');
  fill(main, h('h1', null, 'No such page'),
    h('p', { 'data-test': 'not-found' }, 'The console has no page at this address. ', h('a', { href: '/console/' }, 'See the instances.')));
}

// ---------------------------------------------------------------------------------------
// Navigation, routing and start
// ---------------------------------------------------------------------------------------

/** The main navigation; Push and Audit only with the rights. */
function buildNav(who, section) {
  const links = [
    ['instances', '/console/', 'Instances'],
    ['run', '/console/run', 'Run'],
    ['history', '/console/executions', 'History'],
    who?.rights?.push ? ['push', '/console/push', 'Push'] : null,
    who?.rights?.audit ? ['audit', '/console/audit', 'Audit'] : null,
  ].filter(Boolean);
  const nav = document.getElementById('nav');
  if (nav) fill(nav, h('ul', null, links.map(([key, href, text]) =>
    h('li', null, h('a', { href, 'aria-current': key === section ? 'page' : null, 'data-test': `nav-${key}` }, text)))));
  const whoEl = document.getElementById('who');
  if (whoEl && who) {
    whoEl.textContent = who.principal;
    if (who.caller) whoEl.title = who.caller;
  }
}

/** The page of a path: [section, draw]. */
function route(path, who) {
  const one = (re) => {
    const m = re.exec(path);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch {
      return null;
    }
  };
  if (path === '/console/' || path === '/console') return ['instances', instancesPage];
  let arg = one(/^\/console\/vms\/([^/]+)\/?$/);
  if (arg != null) return ['instances', () => vmPage(arg, who)];
  if (/^\/console\/run\/?$/.test(path)) return ['run', runPage];
  if (/^\/console\/watch\/?$/.test(path)) return ['run', watchPage];
  if (/^\/console\/executions\/?$/.test(path)) return ['history', historyPage];
  arg = one(/^\/console\/executions\/([^/]+)\/?$/);
  if (arg != null) return ['history', () => executionPage(arg)];
  if (/^\/console\/push\/?$/.test(path)) return ['push', () => pushPage(who)];
  if (/^\/console\/audit\/?$/.test(path)) return ['audit', () => auditPage(who)];
  return [null, notFoundPage];
}

async function start() {
  // An icon of our own, so that the browser does not ask the daemon for /favicon.ico.
  if (!document.querySelector('link[rel~="icon"]')) {
    document.head.append(h('link', { rel: 'icon', href: 'data:image/svg+xml,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22 viewBox=%220 0 16 16%22%3E%3Crect width=%2216%22 height=%2216%22 rx=%223%22 fill=%22%232b5fd9%22/%3E%3C/svg%3E' }));
  }
  let who = null;
  try {
    who = await api('/v1/whoami');
  } catch (e) {
    if (sessionGone) {
      buildNav(null, null);
      fill(main, h('h1', null, 'Session ended'), h('p', null, h('a', { href: '/console/login' }, 'Log in again'), '.'));
      return;
    }
    // An older daemon without /v1/whoami: the pages still work; rights are unknown.
  }
  const [section, draw] = route(location.pathname, who);
  buildNav(who, section);
  try {
    await draw();
  } catch (e) {
    main.append(problem(`Something went wrong on this page: ${e.message}`));
  }
}

start();
