// fastrelay live dashboard. Plain JavaScript, no build step, no dependencies.
//
// Shape: WebSocket messages only mutate the model and mark what changed;
// one requestAnimationFrame callback at a time turns those marks into DOM
// writes: the rows of dirty machines that are on screen (each at most every
// rowMinMs), and the log at most every logRenderMs with a capped number of
// lines. That is what keeps the tab responsive at thousands of events per
// second: the cost of a frame follows what is on screen, not the event rate.
//
// Resume (DESIGN §7): the page remembers the relay's epoch and the seq of the
// last event it applied, and reconnects with ?epoch=&since=. A `resumed` reply
// keeps the grid and the log, and the missed events follow as live ones; an
// `initial` instead rebuilds the grid and says in the log that events may be
// missing. An event whose seq was already applied in this epoch is skipped.
//
// Tests and scripts read `tr[data-machine-id][data-state]`, `#conn[data-status]`,
// `#log li[data-type][data-machine-id]`, `#log li.gap` and `window.fastrelayDashboard`.
(function () {
  'use strict';

  const CFG = Object.freeze({
    logCap: 500,            // events kept in memory for the log
    logDomCap: 150,         // log lines kept in the DOM while live (all logCap when paused)
    logFloodLines: 60,      // lines drawn when more than logDomCap arrived since the last draw
    logRenderMs: 200,       // the log is redrawn at most this often
    rowMinMs: 100,          // a row is redrawn at most this often (first change: at once)
    rowsPerFrame: 120,      // rows redrawn per frame at most; the rest wait, oldest first
    resortMs: 500,          // re-sort on changing values at most this often
    backoffBaseMs: 500,
    backoffCapMs: 10000,
    healthyAfterMs: 10000,  // a connection open this long resets the backoff
    healthPollMs: 3000,
    healthTimeoutMs: 2500,
    offlineAfterMs: 30000,  // unreachable this long: shown as offline
    defaultWsPath: '/ws/events',
  });

  const token = new URLSearchParams(location.search).get('token');

  // ---------------------------------------------------------------- model

  /** Everything the page knows; the test hook exposes it as is. */
  const model = {
    machines: new Map(),    // id -> machine (see newMachine)
    log: [],                // newest last; trimmed to CFG.logCap
    logSeq: 0,              // seq of the newest log entry ever pushed
    epoch: null,            // the relay's stream epoch, from initial/resumed
    seq: 0,                 // seq of the last relayed event applied in that epoch
    serverOffset: 0,        // server clock - local clock, seconds
    health: null,           // last /healthz answer
    healthOk: null,
    wsPath: CFG.defaultWsPath,
  };

  const stats = {
    messages: 0, events: 0, initials: 0, pings: 0, pongs: 0, badFrames: 0,
    connects: 0, closes: 0, renders: 0, lastRenderMs: 0, maxRenderMs: 0,
    resumed: 0, rebuilt: 0, duplicates: 0, seqGaps: 0,
    eventsPerSec: 0, lastClose: null,
  };

  function newMachine(id) {
    return {
      id: id,
      current_state: null,
      previous_state: null,
      last_activity: null,  // unix seconds, server clock
      state_since: null,    // unix seconds; when current_state began (best known)
      data: undefined,
      count: 0,             // events seen for this machine
      rate: 0,              // events per second, smoothed
      _lastCount: 0,
    };
  }

  function serverNow() { return Date.now() / 1000 + model.serverOffset; }

  function num(v) { return typeof v === 'number' && isFinite(v) ? v : null; }

  function noteServerClock(ts) {
    if (typeof ts !== 'number') return;
    const off = ts - Date.now() / 1000;
    // Same-host relays are within milliseconds; only correct a real skew so
    // the ages shown do not jitter with message latency.
    model.serverOffset = Math.abs(off) > 2 ? off : 0;
  }

  // --------------------------------------------------------- dirty marks

  const dirty = new Set();     // machine ids whose row needs redrawing
  let structureDirty = false;  // rows to create or remove
  let orderDirty = false;      // re-sort now (new rows, user action)
  let orderStale = false;      // a sort key changed; re-sort when due
  let clockDirty = false;      // redraw the time and rate cells of every row
  let filterDirty = false;     // the machine filter changed: show/hide every row
  let logDirty = false;
  let logRebuild = false;      // redraw the whole log (filter, resume, clear)
  let statusDirty = true;
  let healthDirty = false;
  let rafPending = false;

  function schedule() {
    if (!rafPending) {
      rafPending = true;
      requestAnimationFrame(render);
    }
  }

  function touch(m, sortKeyChanged) {
    dirty.add(m.id);
    if (sortKeyChanged) orderStale = true;
    schedule();
  }

  // ----------------------------------------------------- applying messages

  function applyInitial(msg) {
    stats.initials++;
    noteServerClock(msg.timestamp);
    const old = model.machines;
    const next = new Map();
    const list = Array.isArray(msg.machines) ? msg.machines : [];
    for (const s of list) {
      if (!s || typeof s !== 'object' || s.id === undefined || s.id === null) continue;
      const id = String(s.id);
      const prev = old.get(id);
      const m = newMachine(id);
      m.current_state = typeof s.current_state === 'string' ? s.current_state : null;
      m.previous_state = typeof s.previous_state === 'string' ? s.previous_state : null;
      m.last_activity = num(s.last_activity);
      m.data = s.data;
      const since = num(s.state_since) ?? num(s.entered_at);
      if (since !== null) m.state_since = since;
      else if (prev && prev.current_state === m.current_state && prev.state_since !== null) m.state_since = prev.state_since;
      else m.state_since = m.last_activity;
      if (prev) { m.count = prev.count; m.rate = prev.rate; m._lastCount = prev._lastCount; }
      next.set(id, m);
    }
    model.machines = next;
    for (const id of next.keys()) dirty.add(id);
    structureDirty = true;
    orderDirty = true;
    pushSys('snapshot: ' + next.size + (next.size === 1 ? ' machine' : ' machines'));
    schedule();
  }

  // The stream's position as the relay states it: a non-negative integer, or null.
  function seqOf(v) { return Number.isSafeInteger(v) && v >= 0 ? v : null; }

  /** Take up the stream position of an initial or resumed message. */
  function notePosition(msg) {
    model.epoch = typeof msg.epoch === 'string' && msg.epoch !== '' ? msg.epoch : null;
    model.seq = seqOf(msg.seq) ?? 0;
  }

  function applyEvent(msg) {
    const seq = seqOf(msg.seq);
    if (seq !== null && model.epoch !== null) {
      // Never twice: a replay may overlap what this page already applied.
      if (seq <= model.seq) { stats.duplicates++; return; }
      if (seq > model.seq + 1) stats.seqGaps++;
      model.seq = seq;
    }
    stats.events++;
    const ts = num(msg.timestamp) ?? serverNow();
    const rawId = msg.machine_id;
    if (rawId !== undefined && rawId !== null && rawId !== '') {
      const id = String(rawId);
      let m = model.machines.get(id);
      const sortKeyChanged = sortKey !== 'id';
      if (!m) {
        m = newMachine(id);
        model.machines.set(id, m);
        structureDirty = true;
        orderDirty = true;
      }
      if (typeof msg.state === 'string') {
        if (m.current_state !== msg.state) {
          m.previous_state = m.current_state;
          m.current_state = msg.state;
          m.state_since = ts;
        }
        if (typeof msg.previous_state === 'string') m.previous_state = msg.previous_state;
        if (msg.data !== undefined) m.data = msg.data;
      }
      m.last_activity = ts;
      m.count++;
      touch(m, sortKeyChanged);
    }
    pushLog(msg, ts);
  }

  function applyResumed(msg) {
    stats.resumed++;
    const since = seqOf(msg.since);
    const last = seqOf(msg.seq);
    if (msg.epoch !== model.epoch || since === null || since > model.seq) {
      // Not the position this page asked for (the relay would not do this):
      // start over from a snapshot, which then marks the gap in the log.
      model.epoch = null;
      starting = true;
      send('{"type":"refresh"}');
      return;
    }
    const missed = last === null ? 0 : Math.max(0, last - model.seq);
    pushSys('resumed after seq ' + model.seq + ': ' + missed.toLocaleString('en-US') +
      (missed === 1 ? ' missed event follows' : ' missed events follow'));
  }

  function onFrame(text) {
    if (typeof text !== 'string') { stats.badFrames++; return; }
    let msg;
    try { msg = JSON.parse(text); } catch (e) { stats.badFrames++; return; }
    if (!msg || typeof msg !== 'object' || Array.isArray(msg)) { stats.badFrames++; return; }
    stats.messages++;
    lastFrameAt = performance.now();
    switch (msg.type) {
      case 'ping':
        stats.pings++;
        if (send('{"type":"pong"}')) stats.pongs++;
        notePing(msg);
        return;
      case 'initial':
        if (starting) {
          starting = false;
          // A reconnect that could not resume: whatever happened in between
          // is not in the log. Say so; the snapshot below rebuilds the grid.
          if (stats.initials > 0 && !(msg.epoch === model.epoch && seqOf(msg.seq) === model.seq)) {
            stats.rebuilt++;
            pushSys('reconnected: rebuilt from a fresh snapshot; events in between may be missing', 'gap');
          }
        }
        // A refresh reply too: the events after it start at its seq + 1.
        notePosition(msg);
        applyInitial(msg);
        // The relay answered with its snapshot: this connection is healthy.
        attempt = 0;
        pollHealth();  // its client count now includes this page
        return;
      case 'resumed':
        starting = false;
        applyResumed(msg);
        attempt = 0;
        pollHealth();
        return;
      default:
        applyEvent(msg);
    }
  }

  // ------------------------------------------------------------- event log

  function pushLog(msg, ts) {
    const e = { seq: ++model.logSeq, ts: ts, type: String(msg.type), mid: msg.machine_id, msg: msg, text: null, sys: false };
    model.log.push(e);
    if (model.log.length > CFG.logCap * 2) model.log.splice(0, model.log.length - CFG.logCap);
    logDirty = true;
    schedule();
  }

  function pushSys(text, mark) {
    const e = { seq: ++model.logSeq, ts: serverNow(), type: 'relay', mid: undefined, msg: null, text: null, sys: true, note: text, mark: mark };
    model.log.push(e);
    if (model.log.length > CFG.logCap * 2) model.log.splice(0, model.log.length - CFG.logCap);
    logDirty = true;
    schedule();
  }

  // ----------------------------------------------------------- connection

  let ws = null;
  let status = 'connecting';   // connecting | connected | reconnecting | offline
  let attempt = 0;             // consecutive failed or short connections
  let retryAt = 0;             // performance.now() of the next attempt
  let retryTimer = 0;
  let openedAt = 0;
  let lastFrameAt = 0;
  let lastPingAt = 0;
  let pingIntervalMs = 0;      // learned from the relay's pings
  let unreachableSince = 0;    // performance.now() of the first failure in a row
  let starting = false;        // this connection's initial or resumed is still to come

  function setStatus(s) {
    if (status !== s) {
      status = s;
      statusDirty = true;
      schedule();
    }
  }

  function send(text) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(text);
      return true;
    }
    return false;
  }

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let url = scheme + '//' + location.host + model.wsPath;
    if (token !== null) url += (url.indexOf('?') >= 0 ? '&' : '?') + 'token=' + encodeURIComponent(token);
    if (model.epoch !== null) {
      url += (url.indexOf('?') >= 0 ? '&' : '?') + 'epoch=' + encodeURIComponent(model.epoch) +
        '&since=' + model.seq;
    }
    return url;
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = 0;
    if (ws) return;
    setStatus('connecting');
    let sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    starting = true;
    sock.onopen = function () {
      if (ws !== sock) return;
      openedAt = performance.now();
      lastFrameAt = openedAt;
      unreachableSince = 0;
      stats.connects++;
      setStatus('connected');
      pushSys('connected to ' + model.wsPath);
    };
    sock.onmessage = function (ev) {
      if (ws === sock) onFrame(ev.data);
    };
    sock.onclose = function (ev) {
      if (ws !== sock) return;
      dropSocket(ev);
    };
    sock.onerror = function () { /* onclose follows and says what happened */ };
  }

  function dropSocket(ev) {
    const sock = ws;
    ws = null;
    if (sock) {
      sock.onopen = sock.onmessage = sock.onclose = sock.onerror = null;
      try { sock.close(); } catch (e) { /* already closed */ }
    }
    stats.closes++;
    const wasOpen = openedAt > 0;
    if (wasOpen && performance.now() - openedAt >= CFG.healthyAfterMs) attempt = 0;
    openedAt = 0;
    pingIntervalMs = 0;
    lastPingAt = 0;
    stats.lastClose = ev ? { code: ev.code, reason: ev.reason || '' } : null;
    if (wasOpen) {
      pushSys('connection closed' + (ev ? ' (code ' + ev.code + (ev.reason ? ', ' + ev.reason : '') + ')' : ''));
    }
    if (!unreachableSince) unreachableSince = performance.now();
    scheduleReconnect();
  }

  function backoffMs(n) {
    const exp = Math.min(CFG.backoffCapMs, CFG.backoffBaseMs * Math.pow(2, Math.max(0, n - 1)));
    // "Equal jitter": at least half the step, so pages that lost the same
    // relay do not all come back in the same millisecond.
    return exp / 2 + Math.random() * exp / 2;
  }

  function scheduleReconnect() {
    attempt++;
    const delay = backoffMs(attempt);
    retryAt = performance.now() + delay;
    clearTimeout(retryTimer);
    retryTimer = setTimeout(function () { retryTimer = 0; refreshWsPath().then(connect); }, delay);
    updateOfflineStatus();
    tickCountdown();
  }

  function updateOfflineStatus() {
    if (ws) return;
    const offline = navigator.onLine === false ||
      (unreachableSince && performance.now() - unreachableSince >= CFG.offlineAfterMs);
    setStatus(offline ? 'offline' : 'reconnecting');
  }

  let countdownTimer = 0;
  function tickCountdown() {
    clearTimeout(countdownTimer);
    if (ws || !retryTimer) return;
    statusDirty = true;
    schedule();
    countdownTimer = setTimeout(tickCountdown, 250);
  }

  function notePing(msg) {
    noteServerClock(msg.timestamp);
    const now = performance.now();
    if (lastPingAt) pingIntervalMs = now - lastPingAt;
    lastPingAt = now;
  }

  // A relay that vanished without closing the TCP connection (host suspended,
  // cable pulled) sends nothing more: once pings have been seen, silence for
  // well over three intervals means the connection is dead.
  function checkLiveness() {
    if (!ws || ws.readyState !== WebSocket.OPEN || !pingIntervalMs) return;
    const limit = Math.max(5000, 3.5 * pingIntervalMs);
    if (performance.now() - lastFrameAt > limit) {
      pushSys('no frame for ' + Math.round(limit / 1000) + ' s: reconnecting');
      dropSocket(null);
    }
  }

  window.addEventListener('online', function () {
    if (!ws) { attempt = 0; connect(); }
  });
  window.addEventListener('offline', updateOfflineStatus);

  // --------------------------------------------------------------- health

  let healthTimer = 0;
  let healthGen = 0;           // only the latest poll schedules the next one

  function fetchHealth() {
    const ctl = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = ctl ? setTimeout(function () { ctl.abort(); }, CFG.healthTimeoutMs) : 0;
    return fetch('/healthz', { cache: 'no-store', signal: ctl ? ctl.signal : undefined })
      .then(function (r) {
        if (!r.ok) throw new Error('HTTP ' + r.status);
        return r.json();
      })
      .then(function (h) {
        model.health = h;
        model.healthOk = true;
        if (h && typeof h.ws_path === 'string' && h.ws_path.charAt(0) === '/') model.wsPath = h.ws_path;
        return true;
      }, function () {
        model.healthOk = false;
        return false;
      })
      .then(function (ok) {
        clearTimeout(timer);
        healthDirty = true;
        schedule();
        return ok;
      });
  }

  function refreshWsPath() { return fetchHealth().catch(function () { return false; }); }

  function pollHealth() {
    clearTimeout(healthTimer);
    const gen = ++healthGen;
    fetchHealth().then(function () {
      if (gen === healthGen) healthTimer = setTimeout(pollHealth, CFG.healthPollMs);
    });
  }

  // ------------------------------------------------------------ rendering

  const $ = function (id) { return document.getElementById(id); };
  const el = {
    conn: $('conn'), connText: $('conn-text'), health: $('health'),
    hBackend: $('h-backend'), hClients: $('h-clients'), hMachines: $('h-machines'),
    hAccepted: $('h-accepted'), hRelayed: $('h-relayed'), hRejects: $('h-rejects'),
    hLag: $('h-lag'), hVersion: $('h-version'),
    rows: $('machine-rows'), empty: $('machines-empty'), count: $('machine-count'),
    filter: $('machine-filter'), table: $('machines'),
    log: $('log'), logFilter: $('log-filter'), logStates: $('log-states'),
    logPause: $('log-pause'), logClear: $('log-clear'), logInfo: $('log-info'),
    refresh: $('refresh'), rowTemplate: $('row-template'),
  };

  // Stable colour per state name: a few conventional names get their
  // conventional colour (failures red, successes green); any other name gets
  // a hue from a hash of it, outside the red and green bands, and one of three lightness
  // steps, so two states rarely look alike and none passes for a failure or
  // a success.
  const KNOWN_HUES = {
    error: 0, failed: 0, failure: 0, crashed: 0, fatal: 0, dead: 0,
    done: 135, completed: 135, complete: 135, success: 135, succeeded: 135, finished: 135, ok: 135,
  };
  function hashHue(x) {
    const h = x % 225;                    // [20, 75) and [170, 340): no red, no green
    return h < 55 ? 20 + h : 115 + h;
  }
  const hueCache = new Map();
  function colourOf(name) {
    let c = hueCache.get(name);
    if (c === undefined) {
      let x = 0x811c9dc5;                 // FNV-1a ...
      for (let i = 0; i < name.length; i++) {
        x ^= name.charCodeAt(i);
        x = Math.imul(x, 0x01000193);
      }
      x ^= x >>> 16;                      // ... then murmur3's finalizer to spread the bits
      x = Math.imul(x, 0x85ebca6b);
      x ^= x >>> 13;
      x = Math.imul(x, 0xc2b2ae35);
      x ^= x >>> 16;
      x >>>= 0;
      const known = KNOWN_HUES[name.toLowerCase()];
      c = known === undefined
        ? { hue: String(hashHue(x)), light: ['-6%', '0%', '6%'][(x >>> 12) % 3] }
        : { hue: String(known), light: '0%' };
      if (hueCache.size > 1000) hueCache.clear();
      hueCache.set(name, c);
    }
    return c;
  }

  function setBadge(span, state) {
    if (state === null || state === undefined) {
      span.textContent = '—';
      span.classList.add('none');
      span.style.removeProperty('--hue');
      span.style.removeProperty('--shade');
    } else {
      const c = colourOf(state);
      span.textContent = state;
      span.classList.remove('none');
      span.style.setProperty('--hue', c.hue);
      span.style.setProperty('--shade', c.light);
    }
  }

  function fmtAgo(sec) {
    if (sec === null) return '—';
    if (sec < 60) return Math.floor(sec) + ' s ago';
    if (sec < 3600) return Math.floor(sec / 60) + ' min ago';
    if (sec < 86400) return Math.floor(sec / 3600) + ' h ago';
    return Math.floor(sec / 86400) + ' d ago';
  }

  function fmtDuration(sec) {
    if (sec === null) return '—';
    const s = Math.floor(sec);
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
    return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
  }

  function fmtRate(r) {
    if (r < 0.05) return '0';
    if (r < 10) return r.toFixed(1);
    return String(Math.round(r));
  }

  function fmtInt(n) { return typeof n === 'number' ? n.toLocaleString('en-US') : '—'; }

  function fmtClock(ts) {
    const d = new Date((ts - model.serverOffset) * 1000);
    const p = function (n, w) { return String(n).padStart(w, '0'); };
    return p(d.getHours(), 2) + ':' + p(d.getMinutes(), 2) + ':' + p(d.getSeconds(), 2) + '.' + p(d.getMilliseconds(), 3);
  }

  // One view per machine row; it remembers what it last wrote so a frame
  // touches the DOM only where a value really changed.
  const views = new Map();     // id -> view
  const viewOfRow = new WeakMap();

  // Only rows on screen (or close to it) get their cells redrawn; the others
  // keep data-state and their filter visibility exact and are drawn in full
  // when they scroll into view. A frame's cost then follows the rows a person
  // can see, not the number of machines.
  const onScreen = typeof IntersectionObserver === 'function'
    ? new IntersectionObserver(function (entries) {
      for (const e of entries) {
        const v = viewOfRow.get(e.target);
        if (!v) continue;
        v.visible = e.isIntersecting;
        if (v.visible && v.stale) { dirty.add(v.id); schedule(); }
      }
    }, { root: el.rows.closest('.scroll'), rootMargin: '300px 0px' })
    : null;

  function makeView(id) {
    const tr = el.rowTemplate.content.firstElementChild.cloneNode(true);
    tr.dataset.machineId = id;
    const c = tr.children;
    c[0].textContent = id;
    c[0].title = id;
    const v = {
      id: id, tr: tr, state: c[1].firstElementChild, prev: c[2].firstElementChild,
      since: c[3], activity: c[4], rate: c[5],
      renderedAt: -Infinity, visible: true, stale: false,
      w: { attr: undefined, state: undefined, prev: undefined, since: '', activity: '', rate: '', shown: true },
    };
    viewOfRow.set(tr, v);
    if (onScreen) onScreen.observe(tr);
    return v;
  }

  function dropView(v) {
    if (onScreen) onScreen.unobserve(v.tr);
    v.tr.remove();
  }

  // The cheap part, done for every dirty row: the attribute tests and
  // scripts read, and whether the filter shows the row.
  function renderRowMeta(m, v) {
    const w = v.w;
    if (w.attr !== m.current_state) {
      w.attr = m.current_state;
      v.tr.dataset.state = m.current_state === null ? '' : m.current_state;
      const shown = matchesMachine(m);
      if (w.shown !== shown) {
        w.shown = shown;
        v.tr.hidden = !shown;
        countDirty = true;
      }
    }
  }

  // The visible part: badges and clock cells.
  function renderRow(m, v, nowS) {
    const w = v.w;
    if (w.state !== m.current_state) {
      w.state = m.current_state;
      setBadge(v.state, m.current_state);
    }
    if (w.prev !== m.previous_state) {
      w.prev = m.previous_state;
      setBadge(v.prev, m.previous_state);
    }
    renderClock(m, v, nowS);
    v.stale = false;
  }

  function renderClock(m, v, nowS) {
    const w = v.w;
    const since = fmtDuration(m.state_since === null ? null : Math.max(0, nowS - m.state_since));
    if (since !== w.since) { w.since = since; v.since.textContent = since; }
    const act = fmtAgo(m.last_activity === null ? null : Math.max(0, nowS - m.last_activity));
    if (act !== w.activity) { w.activity = act; v.activity.textContent = act; }
    const rate = fmtRate(m.rate);
    if (rate !== w.rate) { w.rate = rate; v.rate.textContent = rate; }
  }

  // ------------------------------------------------------ filter and sort

  let machineTerms = [];
  function parseTerms(text) { return text.toLowerCase().split(/\s+/).filter(Boolean); }

  function matchesMachine(m) {
    if (!machineTerms.length) return true;
    const id = m.id.toLowerCase();
    const st = m.current_state === null ? '' : m.current_state.toLowerCase();
    for (const t of machineTerms) {
      if (id.indexOf(t) < 0 && st.indexOf(t) < 0) return false;
    }
    return true;
  }

  let sortKey = 'id';
  let sortDir = 1;
  let lastSortAt = 0;
  let countDirty = true;
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });

  function cmpStr(a, b) {
    if (a === b) return 0;
    if (a === null) return 1;   // unknown last, whatever the direction
    if (b === null) return -1;
    return collator.compare(a, b) * sortDir;
  }
  function cmpNum(a, b) {
    if (a === b) return 0;
    if (a === null) return 1;
    if (b === null) return -1;
    return (a - b) * sortDir;
  }

  function compareMachines(a, b) {
    let r = 0;
    switch (sortKey) {
      case 'state': r = cmpStr(a.current_state, b.current_state); break;
      case 'prev': r = cmpStr(a.previous_state, b.previous_state); break;
      // "in state" ascending = shortest time in state first = latest start first.
      case 'since': r = cmpNum(b.state_since, a.state_since); break;
      case 'activity': r = cmpNum(b.last_activity, a.last_activity); break;
      case 'rate': r = cmpNum(a.rate, b.rate); break;
      default: break;
    }
    return r || collator.compare(a.id, b.id) * (sortKey === 'id' ? sortDir : 1);
  }

  function applyOrder() {
    const list = Array.from(model.machines.values()).sort(compareMachines);
    const body = el.rows;
    // Move only rows that are out of place, so a stable order costs no DOM writes.
    let cursor = body.firstElementChild;
    for (const m of list) {
      const tr = views.get(m.id).tr;
      if (tr === cursor) cursor = cursor.nextElementSibling;
      else body.insertBefore(tr, cursor);
    }
    orderDirty = false;
    orderStale = false;
    lastSortAt = performance.now();
  }

  function syncRows() {
    for (const [id, v] of views) {
      if (!model.machines.has(id)) {
        dropView(v);
        views.delete(id);
      }
    }
    for (const id of model.machines.keys()) {
      if (!views.has(id)) {
        const v = makeView(id);
        views.set(id, v);
        el.rows.appendChild(v.tr);
        dirty.add(id);
      }
    }
    structureDirty = false;
    countDirty = true;
  }

  function renderCount() {
    let shown = 0;
    for (const v of views.values()) if (v.w.shown) shown++;
    const total = views.size;
    el.count.textContent = total + (total === 1 ? ' machine' : ' machines') +
      (shown !== total ? ' · ' + shown + ' shown' : '') +
      ' · ' + fmtRate(stats.eventsPerSec) + ' events/s';
    el.empty.hidden = total > 0;
    countDirty = false;
  }

  // ------------------------------------------------------------ log view

  let logTerms = [];
  let logStates = true;
  let logPaused = false;
  let logRenderedSeq = 0;
  let logPausedAtSeq = 0;
  let lastLogRenderAt = 0;

  function fmtValue(v) {
    if (typeof v === 'string') return v;
    const j = JSON.stringify(v);
    return j === undefined ? String(v) : j;
  }

  // One readable line: "[level] message k=v k=v"; the fields of `data` are
  // shown as if they were the event's own.
  function summary(e) {
    if (e.text !== null) return e.text;
    let s;
    if (e.sys) {
      s = e.note;
    } else {
      const msg = e.msg;
      const parts = [];
      if (typeof msg.level === 'string') parts.push('[' + msg.level + ']');
      if (typeof msg.message === 'string') parts.push(msg.message);
      const pairs = function (obj, skipOwn) {
        for (const k in obj) {
          if (skipOwn) {
            // seq is the relay's stream position, not what the event says.
            if (k === 'type' || k === 'machine_id' || k === 'timestamp' || k === 'seq' || k === 'level' || k === 'message') continue;
            if (typeof msg.state === 'string' && (k === 'state' || k === 'previous_state')) continue;
            if (k === 'data' && obj.data && typeof obj.data === 'object' && !Array.isArray(obj.data)) {
              pairs(obj.data, false);
              continue;
            }
          }
          parts.push(k + '=' + fmtValue(obj[k]));
        }
      };
      pairs(msg, true);
      s = parts.join(' ');
      if (s.length > 300) s = s.slice(0, 300) + '…';
    }
    e.text = s;
    return s;
  }

  function matchesLog(e) {
    if (!logStates && e.type === 'state_change') return false;
    if (!logTerms.length) return true;
    const hay = (e.type + ' ' + (e.mid === undefined || e.mid === null ? '' : e.mid) + ' ' +
      (e.msg && typeof e.msg.state === 'string' ? e.msg.state + ' ' : '') + summary(e)).toLowerCase();
    for (const t of logTerms) if (hay.indexOf(t) < 0) return false;
    return true;
  }

  function logNode(e) {
    const li = document.createElement('li');
    li.dataset.type = e.type;
    li.dataset.seq = String(e.seq);
    if (e.sys) li.className = e.mark ? 'sys ' + e.mark : 'sys';
    if (e.mid !== undefined && e.mid !== null) li.dataset.machineId = String(e.mid);
    const t = document.createElement('time');
    t.textContent = fmtClock(e.ts);
    const ty = document.createElement('span');
    ty.className = 'type';
    ty.textContent = e.type;
    li.append(t, ty);
    if (e.mid !== undefined && e.mid !== null) {
      const mid = document.createElement('span');
      mid.className = 'mid';
      mid.textContent = String(e.mid);
      li.append(mid);
    }
    const msg = document.createElement('span');
    msg.className = 'msg';
    if (!e.sys && typeof e.msg.state === 'string') {
      const a = document.createElement('span');
      a.className = 'badge ghost';
      setBadge(a, typeof e.msg.previous_state === 'string' ? e.msg.previous_state : null);
      const b = document.createElement('span');
      b.className = 'badge';
      setBadge(b, e.msg.state);
      msg.append(a, ' → ', b);
      const rest = summary(e);
      if (rest) msg.append(' ' + rest);
    } else {
      msg.textContent = summary(e);
    }
    li.append(msg);
    return li;
  }

  function rebuildLog(uptoSeq, cap) {
    const log = model.log;
    const frag = document.createDocumentFragment();
    let n = 0;
    for (let i = log.length - 1; i >= 0 && n < cap; i--) {
      const e = log[i];
      if (e.seq > uptoSeq) continue;
      if (e.seq <= model.logSeq - CFG.logCap) break;
      if (matchesLog(e)) { frag.append(logNode(e)); n++; }
    }
    el.log.replaceChildren(frag);
  }

  function renderLog(now) {
    const log = model.log;
    const list = el.log;
    const newest = model.logSeq;
    if (logPaused) {
      // Paused: the whole ring, frozen at the moment of the pause, to read back.
      if (logRebuild) rebuildLog(logPausedAtSeq, CFG.logCap);
    } else {
      const fresh = newest - logRenderedSeq;
      if (logRebuild) {
        rebuildLog(newest, CFG.logDomCap);
      } else if (fresh >= CFG.logDomCap) {
        // A flood: draw a screenful of the newest from the ring rather than
        // insert lines only to remove them; Pause shows the whole ring.
        rebuildLog(newest, CFG.logFloodLines);
      } else if (fresh > 0) {
        const frag = document.createDocumentFragment();
        for (let i = log.length - 1; i >= 0 && log[i].seq > logRenderedSeq; i--) {
          if (matchesLog(log[i])) frag.append(logNode(log[i]));
        }
        list.prepend(frag);
        let extra = list.childElementCount - CFG.logDomCap;
        while (extra-- > 0) list.lastElementChild.remove();
      }
      logRenderedSeq = newest;
    }
    logRebuild = false;
    const pending = logPaused ? newest - logPausedAtSeq : 0;
    el.logInfo.textContent = newest.toLocaleString('en-US') + ' events received · showing ' +
      list.childElementCount + (logPaused ? ' · paused, ' + pending.toLocaleString('en-US') + ' new' : '');
    el.logPause.textContent = logPaused ? 'Resume' : 'Pause';
    logDirty = false;
    lastLogRenderAt = now;
  }

  // ------------------------------------------------------ status and health

  function renderStatus() {
    el.conn.dataset.status = status;
    document.body.dataset.status = status;
    let text;
    if (status === 'connected') text = 'connected';
    else if (status === 'connecting') text = 'connecting…';
    else {
      const left = Math.max(0, Math.ceil((retryAt - performance.now()) / 1000));
      const when = retryTimer ? (left > 0 ? 'reconnecting in ' + left + ' s' : 'reconnecting…') : 'reconnecting…';
      text = status === 'offline' ? 'offline · ' + when.replace('reconnecting', 'retry') : when;
    }
    if (el.connText.textContent !== text) el.connText.textContent = text;
    const lc = stats.lastClose;
    el.conn.title = lc ? 'last close: code ' + lc.code + (lc.reason ? ' (' + lc.reason + ')' : '') : '';
    statusDirty = false;
  }

  function renderHealth() {
    const h = model.health || {};
    el.health.dataset.ok = model.healthOk === null ? 'unknown' : String(model.healthOk);
    el.hBackend.textContent = h.backend || '—';
    el.hClients.textContent = fmtInt(h.clients);
    el.hMachines.textContent = fmtInt(h.machines);
    const ev = h.events || {};
    el.hAccepted.textContent = fmtInt(ev.accepted);
    el.hRelayed.textContent = fmtInt(ev.relayed);
    const rj = h.rejects && typeof h.rejects === 'object' ? h.rejects : null;
    let total = 0;
    const parts = [];
    if (rj) for (const k in rj) { total += Number(rj[k]) || 0; parts.push(k + ': ' + rj[k]); }
    el.hRejects.textContent = rj ? fmtInt(total) : '—';
    el.hRejects.title = parts.join('\n');
    el.hLag.textContent = typeof h.loop_lag_ms === 'number' ? h.loop_lag_ms.toFixed(1) + ' ms' : '—';
    el.hVersion.textContent = h.version || '—';
    el.health.title = model.healthOk === false ? 'relay unreachable: /healthz did not answer' : '';
    healthDirty = false;
  }

  // ---------------------------------------------------------- frame loop

  function render(now) {
    rafPending = false;
    const t0 = performance.now();
    if (structureDirty) syncRows();
    const nowS = serverNow();
    if (clockDirty) {
      for (const [id, v] of views) {
        if (!v.visible || !v.w.shown) { v.stale = true; continue; }
        if (dirty.has(id)) continue;
        renderClock(model.machines.get(id), v, nowS);
      }
      clockDirty = false;
      countDirty = true;
    }
    // Nobody reads a row that changes 25 times a second: each row is redrawn
    // at most every rowMinMs, and at most rowsPerFrame rows per frame, so a
    // frame's DOM work stays bounded whatever the event rate. A row quiet for
    // rowMinMs is redrawn in the very next frame.
    let budget = CFG.rowsPerFrame;
    let deferred = false;
    for (const id of dirty) {
      const m = model.machines.get(id);
      const v = views.get(id);
      if (!m || !v) { dirty.delete(id); continue; }
      renderRowMeta(m, v);
      if (!v.visible || !v.w.shown) { v.stale = true; dirty.delete(id); continue; }
      if (t0 - v.renderedAt < CFG.rowMinMs) { deferred = true; continue; }
      if (budget-- <= 0) { deferred = true; continue; }
      renderRow(m, v, nowS);
      v.renderedAt = t0;
      dirty.delete(id);
    }
    if (filterDirty) {
      for (const [id, v] of views) {
        const shown = matchesMachine(model.machines.get(id));
        if (v.w.shown !== shown) {
          v.w.shown = shown;
          v.tr.hidden = !shown;
          if (shown && v.stale) { dirty.add(id); schedule(); }
        }
      }
      filterDirty = false;
      countDirty = true;
    }
    if (orderDirty || (orderStale && t0 - lastSortAt >= CFG.resortMs)) applyOrder();
    if (countDirty) renderCount();
    if (logDirty) {
      if (logRebuild || t0 - lastLogRenderAt >= CFG.logRenderMs) renderLog(t0);
    }
    if (statusDirty) renderStatus();
    if (healthDirty) renderHealth();
    const took = performance.now() - t0;
    stats.renders++;
    stats.lastRenderMs = took;
    if (took > stats.maxRenderMs) stats.maxRenderMs = took;
    // Work postponed by a rate limit comes back on a later frame.
    if (logDirty || orderStale || deferred) schedule();
  }

  // One tick a second: rates, ages, liveness.
  let lastTick = performance.now();
  let lastTickEvents = 0;
  setInterval(function () {
    const t = performance.now();
    const dt = Math.max(0.001, (t - lastTick) / 1000);
    lastTick = t;
    for (const m of model.machines.values()) {
      const inst = (m.count - m._lastCount) / dt;
      m._lastCount = m.count;
      m.rate = m.rate * 0.5 + inst * 0.5;
    }
    const ev = stats.events - lastTickEvents;
    lastTickEvents = stats.events;
    stats.eventsPerSec = stats.eventsPerSec * 0.5 + (ev / dt) * 0.5;
    if (sortKey === 'rate' || sortKey === 'since' || sortKey === 'activity') orderStale = true;
    clockDirty = true;
    checkLiveness();
    if (!ws) updateOfflineStatus();
    schedule();
  }, 1000);

  // ------------------------------------------------------------ controls

  el.filter.addEventListener('input', function () {
    machineTerms = parseTerms(el.filter.value);
    filterDirty = true;
    schedule();
  });

  el.table.tHead.addEventListener('click', function (ev) {
    const th = ev.target.closest('th[data-sort]');
    if (!th) return;
    const key = th.dataset.sort;
    if (key === sortKey) sortDir = -sortDir;
    else { sortKey = key; sortDir = key === 'rate' ? -1 : 1; }  // busiest first
    for (const h of el.table.tHead.querySelectorAll('th[data-sort]')) {
      h.setAttribute('aria-sort', h.dataset.sort === sortKey ? (sortDir > 0 ? 'ascending' : 'descending') : 'none');
    }
    orderDirty = true;
    schedule();
  });

  function logControlsChanged() {
    logTerms = parseTerms(el.logFilter.value);
    logStates = el.logStates.checked;
    logRebuild = true;
    logDirty = true;
    schedule();
  }
  el.logFilter.addEventListener('input', logControlsChanged);
  el.logStates.addEventListener('change', logControlsChanged);

  el.logPause.addEventListener('click', function () {
    logPaused = !logPaused;
    el.logPause.setAttribute('aria-pressed', String(logPaused));
    if (logPaused) logPausedAtSeq = model.logSeq;
    logRebuild = true;
    logDirty = true;
    schedule();
  });

  el.logClear.addEventListener('click', function () {
    model.log.length = 0;
    logRenderedSeq = model.logSeq;
    logPausedAtSeq = model.logSeq;
    el.log.replaceChildren();
    logDirty = true;
    schedule();
  });

  el.refresh.addEventListener('click', function () {
    if (!send('{"type":"refresh"}') && !ws) { attempt = 0; connect(); }
    pollHealth();
  });

  // ------------------------------------------------------------ test hook

  /** Read-only view for tests and for poking around in the console. */
  window.fastrelayDashboard = {
    model: model,
    stats: stats,
    config: CFG,
    get connected() { return !!ws && ws.readyState === WebSocket.OPEN; },
    get status() { return status; },
    get attempt() { return attempt; },
    /** id -> current_state, as a plain object. */
    states: function () {
      const out = {};
      for (const m of model.machines.values()) out[m.id] = m.current_state;
      return out;
    },
    refresh: function () { return send('{"type":"refresh"}'); },
  };

  // ---------------------------------------------------------------- start

  renderStatus();
  renderCount();
  // /healthz first: it names the WebSocket path (the default serves if it fails).
  fetchHealth().then(connect);
  healthTimer = setTimeout(pollHealth, CFG.healthPollMs);
})();
