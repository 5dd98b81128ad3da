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
// Subscription (DESIGN §8): the page can ask the relay for some machines and
// event types only, `?machines=GLOB,...&types=TYPE,...` on the WebSocket and
// on /api/history, and keeps the same parameters in its own URL so a link
// opens the same view. A new filter is a new stream: the page reconnects
// without epoch/since and rebuilds from its initial; a dropped connection
// resumes with the filter it had. A filter the relay refuses (close 1008,
// "bad filter: ...") is shown and not retried until the user changes it.
//
// The state timeline (timeline.js) is built from /api/history after each
// initial (the events up to its seq; the later ones come live) and extended
// by every live state event; spans are keyed by epoch and seq, so a replay
// or a second fetch never draws one twice.
//
// Tests and scripts read `tr[data-machine-id][data-state]`, `#conn[data-status]`,
// `#log li[data-type][data-machine-id]`, `#log li.gap`, `#timeline-tip[data-state]`,
// `#sparkline[data-events]`, `#sub-error` and `window.fastrelayDashboard`.
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
    historyLimit: 5000,     // events asked of /api/history for the timeline
    timelineLanes: 500,     // lanes drawn at most (the first by id that pass the filters)
    timelineKeep: 1000,     // machines whose spans are kept (those that changed state last)
    spansPerLane: 150,      // spans kept per machine (the newest)
    horizonS: 900,          // spans that ended longer ago are forgotten: the longest window
    spanDataChars: 300,     // of an event's data, kept for the hover
    timelineRenderMs: 250,  // the timeline is redrawn at most this often (and this often while time runs)
    sparkSeconds: 60,       // the header's sparkline: events per second over this long
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
    historyLoads: 0, historyEvents: 0, historyErrors: 0, filterChanges: 0,
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
    // Same machines as the grid: the spans of the others go; those kept are
    // completed from the history fetched next.
    timeline.retain(function (id) { return next.has(id); });
    lanesChanged(true);
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
        lanesChanged(false);
      }
      if (typeof msg.state === 'string') {
        if (m.current_state !== msg.state) {
          m.previous_state = m.current_state;
          m.current_state = msg.state;
          m.state_since = ts;
          if (machineTerms.length) lanesChanged(false);  // the grid's filter matches states too
        }
        if (typeof msg.previous_state === 'string') m.previous_state = msg.previous_state;
        if (msg.data !== undefined) m.data = msg.data;
        recordSpan(id, msg, ts, seq, model.epoch);
      }
      m.last_activity = ts;
      m.count++;
      touch(m, sortKeyChanged);
    }
    pushLog(msg, ts);
  }

  /** A state event's span on its machine's lane; false when the lane has it already. */
  function recordSpan(id, msg, ts, seq, epoch) {
    const added = timeline.record(id, {
      state: msg.state, start: ts, seq: seq, epoch: epoch, data: msg.data,
      previous: typeof msg.previous_state === 'string' ? msg.previous_state : null,
    });
    if (added) timelineChanged(false);
    return added;
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
          if (subChanged) {
            // The first snapshot of a new filter, announced when it was applied.
            subChanged = false;
          } else if (stats.initials > 0 && !(msg.epoch === model.epoch && seqOf(msg.seq) === model.seq)) {
            // A reconnect that could not resume: whatever happened in between
            // is not in the log. Say so; the snapshot below rebuilds the grid.
            stats.rebuilt++;
            pushSys('reconnected: rebuilt from a fresh snapshot; events in between may be missing', 'gap');
          }
        }
        // A refresh reply too: the events after it start at its seq + 1.
        notePosition(msg);
        applyInitial(msg);
        loadHistory();
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

  function withQuery(url, params) {
    return params.length ? url + (url.indexOf('?') >= 0 ? '&' : '?') + params.join('&') : url;
  }

  function tokenParams() { return token === null ? [] : ['token=' + encodeURIComponent(token)]; }

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const params = tokenParams().concat(filterParams());
    if (model.epoch !== null) params.push('epoch=' + encodeURIComponent(model.epoch) + '&since=' + model.seq);
    return withQuery(scheme + '//' + location.host + model.wsPath, params);
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

  /** Forget the current socket, if any, without a word to the user. */
  function releaseSocket() {
    const sock = ws;
    ws = null;
    if (sock) {
      sock.onopen = sock.onmessage = sock.onclose = sock.onerror = null;
      try { sock.close(); } catch (e) { /* already closed */ }
    }
    openedAt = 0;
    pingIntervalMs = 0;
    lastPingAt = 0;
  }

  function dropSocket(ev) {
    const wasOpen = openedAt > 0;
    if (wasOpen && performance.now() - openedAt >= CFG.healthyAfterMs) attempt = 0;
    releaseSocket();
    stats.closes++;
    stats.lastClose = ev ? { code: ev.code, reason: ev.reason || '' } : null;
    if (wasOpen) {
      pushSys('connection closed' + (ev ? ' (code ' + ev.code + (ev.reason ? ', ' + ev.reason : '') + ')' : ''));
    }
    // The same filter would be refused again: wait for the user to change it.
    if (ev && ev.code === 1008 && typeof ev.reason === 'string' && ev.reason.startsWith('bad filter:')) {
      refuseSubscription(ev.reason);
      return;
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
    if (ws || subRefused !== null) return;
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
    // Everything up to `through` that our filter takes is already here, so a
    // reconnect may resume from there (the history may have forgotten our
    // last event long ago when the filter matches rarely).
    const through = seqOf(msg.through);
    if (msg.epoch === model.epoch && through !== null && through > model.seq) model.seq = through;
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
    if (!ws && subRefused === null) { attempt = 0; connect(); }
  });
  window.addEventListener('offline', updateOfflineStatus);

  // --------------------------------------------------------- subscription

  /** A comma-separated filter as the relay reads it: terms trimmed; null for none. */
  function filterList(text) {
    if (typeof text !== 'string' || text.trim() === '') return null;
    // Empty terms stay: the relay's refusal says what is wrong better than a silent fix.
    return text.split(',').map(function (t) { return t.trim(); }).join(',');
  }

  function subscriptionOfPage() {
    const q = new URLSearchParams(location.search);
    return { machines: filterList(q.get('machines')), types: filterList(q.get('types')) };
  }

  let sub = subscriptionOfPage();  // {machines, types}: what this page asks the relay for
  let subRefused = null;           // the relay's reason, while it refuses `sub`
  let subChanged = false;          // the next initial is a new filter's first

  // Commas, globs and "?" mean the same raw in a query, and read better in a link.
  function queryValue(v) { return encodeURIComponent(v).replace(/%2C/gi, ',').replace(/%3F/gi, '?'); }

  function filterParams() {
    const out = [];
    if (sub.machines !== null) out.push('machines=' + queryValue(sub.machines));
    if (sub.types !== null) out.push('types=' + queryValue(sub.types));
    return out;
  }

  function describeSubscription() {
    if (sub.machines === null && sub.types === null) return 'the whole stream';
    return 'machines ' + (sub.machines === null ? 'any' : sub.machines) +
      ' · types ' + (sub.types === null ? 'any' : sub.types);
  }

  /** The page's URL says the filter, so that a link or a reload opens the same view. */
  function writePageUrl() {
    // Every other parameter (token=...) stays exactly as it was written.
    const kept = location.search.slice(1).split('&').filter(function (p) {
      return p !== '' && !/^(machines|types)(=|$)/.test(p);
    });
    const query = kept.concat(filterParams()).join('&');
    history.replaceState(history.state, '', location.pathname + (query ? '?' + query : '') + location.hash);
  }

  function applySubscription(machines, types) {
    const next = { machines: filterList(machines), types: filterList(types) };
    const same = next.machines === sub.machines && next.types === sub.types;
    sub = next;
    if (same && subRefused === null) {
      renderSubscription();  // the inputs as the relay reads them
      return;
    }
    subRefused = null;
    stats.filterChanges++;
    writePageUrl();
    renderSubscription();
    pushSys('filter: ' + describeSubscription());
    // Another stream: start over from its snapshot, never resume the old one.
    model.epoch = null;
    model.seq = 0;
    subChanged = true;
    releaseSocket();
    attempt = 0;
    unreachableSince = 0;
    connect();
  }

  function refuseSubscription(reason) {
    subRefused = reason;
    clearTimeout(retryTimer);
    retryTimer = 0;
    setStatus('refused');
    renderSubscription();
  }

  // ----------------------------------------------------------- history

  // Fetched after every initial: that snapshot's seq splits the stream into
  // the past (the relay's history, up to it) and what arrives live (after it).
  let historyGen = 0;          // only the answer to the latest fetch is used

  function loadHistory() {
    const gen = ++historyGen;
    const epoch = model.epoch;
    const upto = model.seq;
    if (epoch === null) return;
    const params = tokenParams().concat(filterParams(), ['limit=' + CFG.historyLimit]);
    fetch(withQuery('/api/history', params), { cache: 'no-store' })
      .then(function (r) {
        if (r.ok) return r.json();
        return r.text().then(function (t) {
          throw new Error('HTTP ' + r.status + (t.trim() ? ': ' + t.trim().slice(0, 200) : ''));
        });
      })
      .then(function (h) {
        if (gen === historyGen) applyHistory(h, epoch, upto);
      }, function (err) {
        stats.historyErrors++;
        if (gen === historyGen) pushSys('no history for the timeline (' + err.message + ')');
      });
  }

  function applyHistory(h, epoch, upto) {
    stats.historyLoads++;
    // Another epoch's seqs say nothing about this one's: none of it applies.
    if (!h || typeof h !== 'object' || h.epoch !== epoch || !Array.isArray(h.events)) return;
    for (const ev of h.events) {
      if (!ev || typeof ev !== 'object' || typeof ev.state !== 'string') continue;
      const seq = seqOf(ev.seq);
      const ts = num(ev.timestamp);
      const rawId = ev.machine_id;
      if (seq === null || seq > upto || ts === null || rawId === undefined || rawId === null || rawId === '') continue;
      const id = String(rawId);
      if (model.machines.has(id) && recordSpan(id, ev, ts, seq, epoch)) stats.historyEvents++;
    }
  }

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
    sub: $('subscription'), subMachines: $('sub-machines'), subTypes: $('sub-types'),
    subClear: $('sub-clear'), subError: $('sub-error'),
    sparkline: $('sparkline'), sparkCanvas: $('spark-canvas'), sparkRate: $('spark-rate'),
    tlScroll: $('timeline-scroll'), tlCanvas: $('timeline-canvas'), tlSpacer: $('timeline-spacer'),
    tlTip: $('timeline-tip'), tlWindow: $('timeline-window'), tlInfo: $('timeline-info'),
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
    else if (status === 'refused') text = 'not connected: filter refused';
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

  // ------------------------------------------------ subscription and spark

  function renderSubscription() {
    el.subMachines.value = sub.machines === null ? '' : sub.machines;
    el.subTypes.value = sub.types === null ? '' : sub.types;
    el.sub.dataset.active = String(sub.machines !== null || sub.types !== null);
    el.subError.hidden = subRefused === null;
    el.subError.textContent = subRefused === null ? '' : subRefused;
  }

  const spark = { rates: [], total: 0, counts: [] };  // the last sparkSeconds ticks, oldest first
  let sparkDirty = true;

  function noteSparkTick(count, dt) {
    spark.rates.push(count / dt);
    spark.counts.push(count);
    spark.total += count;
    if (spark.counts.length > CFG.sparkSeconds) {
      spark.rates.shift();
      spark.total -= spark.counts.shift();
    }
    sparkDirty = true;
  }

  function renderSpark() {
    const c = el.sparkCanvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 120;
    const h = c.clientHeight || 22;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const rates = spark.rates;
    const peak = rates.reduce(function (a, b) { return Math.max(a, b); }, 0);
    const step = w / (CFG.sparkSeconds - 1);
    const y = function (r) { return h - 1 - (peak > 0 ? r / peak : 0) * (h - 3); };
    // Newest at the right edge; the seconds not seen yet are left empty.
    const x0 = w - (rates.length - 1) * step;
    ctx.beginPath();
    rates.forEach(function (r, i) { ctx[i ? 'lineTo' : 'moveTo'](x0 + i * step, y(r)); });
    const line = getComputedStyle(c).color;
    ctx.strokeStyle = line;
    ctx.lineWidth = 1.25;
    ctx.stroke();
    if (rates.length > 1) {
      ctx.lineTo(w, h);
      ctx.lineTo(x0, h);
      ctx.closePath();
      ctx.globalAlpha = 0.18;
      ctx.fillStyle = line;
      ctx.fill();
      ctx.globalAlpha = 1;
    }
    const last = rates.length ? rates[rates.length - 1] : 0;
    el.sparkRate.textContent = fmtRate(last) + ' ev/s';
    el.sparkline.dataset.events = String(spark.total);
    el.sparkline.title = 'events received per second, last ' + CFG.sparkSeconds + ' s: ' +
      spark.total.toLocaleString('en-US') + ' events, peak ' + fmtRate(peak) + ' ev/s';
    sparkDirty = false;
  }

  // --------------------------------------------------------------- timeline

  const timeline = window.fastrelayTimeline({
    scroll: el.tlScroll, canvas: el.tlCanvas, spacer: el.tlSpacer, tip: el.tlTip,
    caps: { lanes: CFG.timelineKeep, spansPerLane: CFG.spansPerLane, horizonS: CFG.horizonS, dataChars: CFG.spanDataChars },
    colourOf: colourOf, setBadge: setBadge, fmtClock: fmtClock, fmtDuration: fmtDuration,
    stateOf: function (id) { const m = model.machines.get(id); return m ? m.current_state : null; },
    now: serverNow,
    onChange: timelineChanged,
  });
  let timelineDirty = true;
  let timelineUrgent = false;  // scrolled, resized, new window: draw on the next frame
  let lastTimelineAt = -Infinity;

  function timelineChanged(urgent) {
    timelineDirty = true;
    if (urgent) timelineUrgent = true;
    schedule();
  }
  let laneListDirty = true;    // which lanes, in which order: recomputed at most every resortMs
  let laneListUrgent = true;
  let lastLaneListAt = -Infinity;

  function lanesChanged(urgent) {
    laneListDirty = true;
    if (urgent) laneListUrgent = true;
    schedule();
  }

  // The grid's machines that pass its filter, by id; at most timelineLanes of them.
  function updateLaneList(now) {
    const list = [];
    for (const m of model.machines.values()) if (matchesMachine(m)) list.push(m.id);
    list.sort(collator.compare);
    const shown = list.length > CFG.timelineLanes ? list.slice(0, CFG.timelineLanes) : list;
    timeline.setLanes(shown);
    el.tlInfo.textContent = shown.length + (shown.length === 1 ? ' lane' : ' lanes') +
      (shown.length < list.length ? ' · the first ' + shown.length + ' of ' + list.length.toLocaleString('en-US') + ' machines: narrow the filter' : '');
    laneListDirty = false;
    laneListUrgent = false;
    lastLaneListAt = now;
    timelineDirty = true;
  }

  function drawTimeline(at) {
    timeline.draw(serverNow());
    timelineDirty = false;
    timelineUrgent = false;
    lastTimelineAt = at;
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
    if (laneListDirty && (laneListUrgent || t0 - lastLaneListAt >= CFG.resortMs)) updateLaneList(t0);
    if (timelineDirty && (timelineUrgent || t0 - lastTimelineAt >= CFG.timelineRenderMs)) drawTimeline(t0);
    if (sparkDirty) renderSpark();
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
    if (logDirty || orderStale || deferred || laneListDirty || timelineDirty) schedule();
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
    noteSparkTick(ev, dt);
    timeline.prune(serverNow());
    if (sortKey === 'rate' || sortKey === 'since' || sortKey === 'activity') orderStale = true;
    clockDirty = true;
    checkLiveness();
    if (!ws) updateOfflineStatus();
    schedule();
  }, 1000);

  // Time runs: the spans in progress grow and the window slides.
  setInterval(function () { timelineChanged(false); }, CFG.timelineRenderMs);

  // ------------------------------------------------------------ controls

  el.filter.addEventListener('input', function () {
    machineTerms = parseTerms(el.filter.value);
    filterDirty = true;
    lanesChanged(true);
  });

  el.sub.addEventListener('submit', function (ev) {
    ev.preventDefault();
    applySubscription(el.subMachines.value, el.subTypes.value);
  });
  el.subClear.addEventListener('click', function () { applySubscription('', ''); });

  el.tlWindow.addEventListener('change', function () {
    const s = Number(el.tlWindow.value);
    if (s > 0) timeline.setWindow(s);
    timelineChanged(true);
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
    /** A reconnect is scheduled. */
    get retrying() { return retryTimer !== 0; },
    /** id -> current_state, as a plain object. */
    states: function () {
      const out = {};
      for (const m of model.machines.values()) out[m.id] = m.current_state;
      return out;
    },
    refresh: function () { return send('{"type":"refresh"}'); },
    /** {window, lanes: [{id, lead, spans: [{state, start, end, seq, epoch, data}]}]}, lanes as drawn. */
    timeline: function () { return timeline.snapshot(serverNow()); },
    /** Client coordinates of the span of event `seq` on lane `id` (scrolled into view), or null. */
    timelinePoint: function (id, seq) { return timeline.pointOf(id, seq, serverNow()); },
    /** Events received in each second of the sparkline, oldest first. */
    sparkline: function () { return spark.counts.slice(); },
  };

  // ---------------------------------------------------------------- start

  renderStatus();
  renderCount();
  renderSubscription();
  timeline.setWindow(Number(el.tlWindow.value) || timeline.window);  // a reload may keep the choice
  // /healthz first: it names the WebSocket path (the default serves if it fails).
  fetchHealth().then(connect);
  healthTimer = setTimeout(pollHealth, CFG.healthPollMs);
})();
