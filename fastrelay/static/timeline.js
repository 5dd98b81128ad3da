// fastrelay dashboard: the state timeline. Plain JavaScript, no build step.
//
// One lane per machine; one coloured span per state event, from that event's
// timestamp to the next one's (or to now). Each lane keeps its spans ordered
// by start and each event once: a span's key is its event's epoch and seq, so
// an event given twice (a replay after a resume, the history fetched again
// after a rebuild) is kept once.
//
// Bounded whatever the stream does: at most caps.lanes lanes (the machines
// that changed state last), caps.spansPerLane spans each (the newest), nothing
// that ended before caps.horizonS ago, and a data preview of caps.dataChars.
//
// Drawn on one canvas the height of the panel's viewport, held in view by
// `position: sticky` while a spacer gives the scrollbar the height of every
// lane: a draw paints the lanes on screen only, however many there are.
(function () {
  'use strict';

  const LANE_H = 18;       // px per lane
  const AXIS_H = 20;       // px of the time axis at the top
  const GUTTER_W = 150;    // px of machine ids at the left
  const PAD_R = 10;
  const LEAD_ALPHA = 0.4;  // a state seen only as "before the first span" is drawn faded

  /**
   * The timeline of one page. `opts`:
   *   scroll, canvas, spacer, tip: its elements (tip holds .tip-state,
   *     .tip-mid, .tip-time, .tip-data);
   *   caps: {lanes, spansPerLane, horizonS, dataChars};
   *   colourOf(state) -> {hue, light}, setBadge(el, state), fmtClock(ts), fmtDuration(s);
   *   stateOf(id): the machine's current state, for a lane without spans;
   *   now(): the relay's clock, unix seconds;
   *   onChange(urgent): ask for a draw (urgent: scrolled or resized, draw on the next frame).
   */
  window.fastrelayTimeline = function (opts) {
    const caps = opts.caps;
    const lanes = new Map();   // id -> {spans, keys}; least recently changed first
    let ids = [];              // the lanes drawn, top to bottom
    let windowS = 300;
    let pointer = null;        // {x, y} over the canvas, CSS px
    let cssW = 0;
    let cssH = 0;
    let dpr = 1;
    const ctx = opts.canvas.getContext('2d');
    const theme = {};          // colours and font from the page's CSS, read at the first draw
    const widths = new Map();  // text -> its width in px, in theme.mono
    const fittedIds = new Map();  // id -> the label that fits the gutter

    // ------------------------------------------------------------ model

    function preview(data) {
      if (data === undefined) return null;
      let s;
      try { s = typeof data === 'string' ? data : JSON.stringify(data); } catch (e) { s = String(data); }
      if (typeof s !== 'string') return null;
      return s.length > caps.dataChars ? s.slice(0, caps.dataChars) + '…' : s;
    }

    // Ordered by start; within one epoch, equal starts by seq (arrival order).
    function after(a, b) {
      if (a.start !== b.start) return a.start > b.start;
      return a.epoch === b.epoch && a.seq !== null && b.seq !== null && a.seq > b.seq;
    }

    /**
     * Add the span a state event begins: ev = {state, start, seq, epoch,
     * previous, data}. Returns false when that event is already there.
     */
    function record(id, ev) {
      const key = ev.seq !== null && ev.epoch !== null ? ev.epoch + '#' + ev.seq : null;
      let lane = lanes.get(id);
      if (lane === undefined) {
        if (lanes.size >= caps.lanes) lanes.delete(lanes.keys().next().value);
        lane = { spans: [], keys: new Set() };
      } else {
        if (key !== null && lane.keys.has(key)) return false;
        lanes.delete(id);  // re-inserted below: Map order is the lane cap's eviction order
      }
      lanes.set(id, lane);
      const span = {
        state: ev.state, start: ev.start, seq: ev.seq, epoch: ev.epoch, key: key,
        previous: ev.previous, data: preview(ev.data),
      };
      if (key !== null) lane.keys.add(key);
      const spans = lane.spans;
      // Live events land at the end; the history's, fetched later, before them.
      let i = spans.length;
      while (i > 0 && after(spans[i - 1], span)) i--;
      spans.splice(i, 0, span);
      if (spans.length > caps.spansPerLane) drop(lane, spans.length - caps.spansPerLane);
      return true;
    }

    function drop(lane, n) {
      for (const gone of lane.spans.splice(0, n)) if (gone.key !== null) lane.keys.delete(gone.key);
    }

    /** Forget spans that ended before the horizon; the one in effect then stays. */
    function prune(now) {
      const horizon = now - caps.horizonS;
      for (const lane of lanes.values()) {
        const spans = lane.spans;
        let n = 0;
        while (n + 1 < spans.length && spans[n + 1].start <= horizon) n++;
        if (n) drop(lane, n);
      }
    }

    /** Keep only the lanes of machines for which `keep(id)` holds. */
    function retain(keep) {
      for (const id of Array.from(lanes.keys())) if (!keep(id)) lanes.delete(id);
    }

    // The state before a lane's first span: what that event says it left,
    // or for a lane without spans the machine's current state.
    function leadState(id, spans) {
      const s = spans.length ? spans[0].previous : opts.stateOf(id);
      return typeof s === 'string' ? s : null;
    }

    function spansOf(id) {
      const lane = lanes.get(id);
      return lane === undefined ? [] : lane.spans;
    }

    // Index of the last span starting at or before t, -1 if none.
    function spanAt(spans, t) {
      let lo = 0;
      let hi = spans.length - 1;
      let found = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (spans[mid].start <= t) { found = mid; lo = mid + 1; } else hi = mid - 1;
      }
      return found;
    }

    // ------------------------------------------------------------ geometry

    function frameOf(now) {
      const plotW = Math.max(1, cssW - GUTTER_W - PAD_R);
      const t0 = now - windowS;
      return {
        now: now, t0: t0, plotL: GUTTER_W, plotR: GUTTER_W + plotW,
        x: function (t) { return GUTTER_W + (t - t0) / windowS * plotW; },
        t: function (x) { return t0 + (x - GUTTER_W) / plotW * windowS; },
      };
    }

    function laneTop(i) { return AXIS_H + i * LANE_H - opts.scroll.scrollTop; }

    /** What is under canvas point (x, y): a span with its lane, or null. */
    function hit(x, y, now) {
      const f = frameOf(now);
      if (y < AXIS_H || x < f.plotL || x > f.plotR) return null;
      const i = Math.floor((y - AXIS_H + opts.scroll.scrollTop) / LANE_H);
      if (i < 0 || i >= ids.length) return null;
      const id = ids[i];
      const spans = spansOf(id);
      const t = f.t(x);
      const k = spanAt(spans, t);
      if (k < 0) {
        const state = leadState(id, spans);
        const end = spans.length ? spans[0].start : now;
        return state === null || t > end ? null : { id: id, state: state, start: null, end: end, seq: null, data: null, ongoing: !spans.length };
      }
      const s = spans[k];
      const ongoing = k + 1 === spans.length;
      const end = ongoing ? now : spans[k + 1].start;
      if (t > end) return null;
      return { id: id, state: s.state, start: s.start, end: end, seq: s.seq, data: s.data, ongoing: ongoing };
    }

    // ------------------------------------------------------------ drawing

    function readTheme() {
      const css = getComputedStyle(document.documentElement);
      const v = function (name, dflt) { return css.getPropertyValue(name).trim() || dflt; };
      theme.text = v('--text', '#1d2329');
      theme.muted = v('--muted', '#67717c');
      theme.line = v('--line', '#dde1e6');
      theme.head = v('--head', '#eef1f4');
      theme.panel = v('--panel', '#ffffff');
      theme.sat = parseFloat(v('--badge-s', '62%')) || 62;
      theme.light = parseFloat(v('--badge-l', '42%')) || 42;
      theme.mono = '11px ' + v('--mono', 'monospace');
      theme.fills = new Map();   // state -> fill, in the badges' colours
      widths.clear();
      fittedIds.clear();
    }

    function fillOf(state) {
      let f = theme.fills.get(state);
      if (f === undefined) {
        const c = opts.colourOf(state);
        f = 'hsl(' + c.hue + ' ' + theme.sat + '% ' + (theme.light + parseFloat(c.light)) + '%)';
        if (theme.fills.size > 1000) theme.fills.clear();
        theme.fills.set(state, f);
      }
      return f;
    }

    function widthOf(text) {
      let w = widths.get(text);
      if (w === undefined) {
        w = ctx.measureText(text).width;
        if (widths.size > 4000) widths.clear();
        widths.set(text, w);
      }
      return w;
    }

    // An id cut to fit the gutter, with an ellipsis.
    function fitted(id) {
      let s = fittedIds.get(id);
      if (s === undefined) {
        s = id;
        const room = GUTTER_W - 14;
        if (ctx.measureText(s).width > room) {
          let n = s.length;
          while (n > 1 && ctx.measureText(s.slice(0, n) + '…').width > room) n--;
          s = s.slice(0, n) + '…';
        }
        if (fittedIds.size > 4000) fittedIds.clear();
        fittedIds.set(id, s);
      }
      return s;
    }

    function resize() {
      dpr = window.devicePixelRatio || 1;
      cssW = opts.scroll.clientWidth;
      cssH = opts.scroll.clientHeight;
      opts.canvas.style.height = cssH + 'px';
      opts.canvas.width = Math.max(1, Math.round(cssW * dpr));
      opts.canvas.height = Math.max(1, Math.round(cssH * dpr));
      sizeSpacer();
    }

    function sizeSpacer() {
      opts.spacer.style.height = Math.max(0, AXIS_H + ids.length * LANE_H - cssH) + 'px';
    }

    function tickStep() {
      const want = windowS / 6;
      for (const s of [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600]) if (s >= want) return s;
      return 3600;
    }

    function ticks(f) {
      const step = tickStep();
      const out = [];
      for (let t = Math.ceil(f.t0 / step) * step; t <= f.now; t += step) out.push(t);
      return { step: step, times: out };
    }

    // Under the spans: the tick lines.
    function drawGrid(f) {
      ctx.fillStyle = theme.line;
      for (const t of ticks(f).times) ctx.fillRect(Math.round(f.x(t)), AXIS_H, 1, cssH - AXIS_H);
    }

    // Over the lanes scrolled under it: the clock.
    function drawAxis(f) {
      ctx.fillStyle = theme.head;
      ctx.fillRect(0, 0, cssW, AXIS_H);
      ctx.fillStyle = theme.line;
      ctx.fillRect(0, AXIS_H - 1, cssW, 1);
      const tk = ticks(f);
      ctx.fillStyle = theme.muted;
      ctx.textAlign = 'center';
      for (const t of tk.times) {
        const x = Math.round(f.x(t));
        if (x > f.plotR - 60) break;  // the room of "now"
        const clock = opts.fmtClock(t);
        ctx.fillText(tk.step < 60 ? clock.slice(0, 8) : clock.slice(0, 5), x, AXIS_H / 2);
      }
      ctx.textAlign = 'right';
      ctx.fillText('now', f.plotR, AXIS_H / 2);
      ctx.textAlign = 'left';
    }

    function drawSpan(f, y, state, start, end, alpha) {
      const x0 = Math.max(f.plotL, f.x(start));
      const x1 = Math.min(f.plotR, f.x(end));
      if (x1 <= f.plotL || x0 >= f.plotR) return;
      const w = x1 - x0;
      ctx.globalAlpha = alpha;
      ctx.fillStyle = fillOf(state);
      // A hairline between neighbours shows where one span ends and the next
      // begins, also when both are in the same state.
      ctx.fillRect(x0, y + 2, w > 3 ? w - 1 : Math.max(w, 1), LANE_H - 4);
      ctx.globalAlpha = 1;
      if (w > widthOf(state) + 8) {
        ctx.fillStyle = '#fff';
        ctx.fillText(state, x0 + 4, y + LANE_H / 2);
      }
    }

    function drawLane(f, i) {
      const id = ids[i];
      const y = laneTop(i);
      ctx.fillStyle = theme.text;
      ctx.fillText(fitted(id), 6, y + LANE_H / 2);
      const spans = spansOf(id);
      const lead = leadState(id, spans);
      if (lead !== null) drawSpan(f, y, lead, f.t0, spans.length ? spans[0].start : f.now, LEAD_ALPHA);
      for (let k = Math.max(0, spanAt(spans, f.t0)); k < spans.length; k++) {
        const s = spans[k];
        if (s.start > f.now) break;
        drawSpan(f, y, s.state, s.start, k + 1 < spans.length ? spans[k + 1].start : f.now, 1);
      }
    }

    function draw(now) {
      if (!theme.fills) readTheme();  // not earlier: the stylesheet may still be on its way
      if (!cssW) resize();
      if (!cssW || !cssH) return;
      const f = frameOf(now);
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, cssW, cssH);
      ctx.font = theme.mono;
      ctx.textBaseline = 'middle';
      ctx.textAlign = 'left';
      const top = opts.scroll.scrollTop;
      const first = Math.max(0, Math.floor(top / LANE_H));
      const last = Math.min(ids.length, Math.ceil((top + cssH - AXIS_H) / LANE_H) + 1);
      drawGrid(f);
      ctx.save();
      ctx.beginPath();
      ctx.rect(0, AXIS_H, cssW, cssH - AXIS_H);
      ctx.clip();
      for (let i = first; i < last; i++) drawLane(f, i);
      ctx.restore();
      drawAxis(f);
      showTip(now);
    }

    // ------------------------------------------------------------ hover

    const tipParts = {
      state: opts.tip.querySelector('.tip-state'),
      mid: opts.tip.querySelector('.tip-mid'),
      time: opts.tip.querySelector('.tip-time'),
      data: opts.tip.querySelector('.tip-data'),
    };

    function showTip(now) {
      const h = pointer === null ? null : hit(pointer.x, pointer.y, now);
      const tip = opts.tip;
      if (h === null) {
        if (!tip.hidden) tip.hidden = true;
        return;
      }
      tip.dataset.state = h.state;
      tip.dataset.machineId = h.id;
      tip.dataset.seq = h.seq === null ? '' : String(h.seq);
      opts.setBadge(tipParts.state, h.state);
      tipParts.mid.textContent = h.id;
      tipParts.time.textContent = h.start === null
        ? 'before ' + opts.fmtClock(h.end) + (h.ongoing ? ' (from the snapshot)' : '')
        : 'from ' + opts.fmtClock(h.start) + ' · ' +
          // Closed spans to the nearest second; a running one counts up as the grid does.
          (h.ongoing ? opts.fmtDuration(h.end - h.start) + ' so far' : opts.fmtDuration(Math.round(h.end - h.start)));
      tipParts.data.textContent = h.data === null ? '' : 'data ' + h.data;
      tip.hidden = false;
      // Beside the pointer, on whichever side the panel has room.
      const box = tip.offsetParent ? tip.offsetParent.getBoundingClientRect() : { width: cssW, height: cssH, left: 0, top: 0 };
      const at = opts.canvas.getBoundingClientRect();
      const px = at.left - box.left + pointer.x;
      const py = at.top - box.top + pointer.y;
      const left = px + 14 + tip.offsetWidth <= box.width ? px + 14 : Math.max(0, px - 14 - tip.offsetWidth);
      const top = Math.max(0, Math.min(py + 14, box.height - tip.offsetHeight));
      tip.style.left = left + 'px';
      tip.style.top = top + 'px';
    }

    opts.canvas.addEventListener('mousemove', function (ev) {
      pointer = { x: ev.offsetX, y: ev.offsetY };
      showTip(opts.now());
    });
    opts.canvas.addEventListener('mouseleave', function () {
      pointer = null;
      showTip(opts.now());
    });
    opts.scroll.addEventListener('scroll', function () { opts.onChange(true); }, { passive: true });
    if (typeof ResizeObserver === 'function') {
      new ResizeObserver(function () { resize(); opts.onChange(true); }).observe(opts.scroll);
    }
    if (window.matchMedia) {
      const scheme = window.matchMedia('(prefers-color-scheme: dark)');
      if (scheme.addEventListener) scheme.addEventListener('change', function () { readTheme(); opts.onChange(true); });
    }

    // ------------------------------------------------------------ API

    return {
      record: record,
      prune: prune,
      retain: retain,
      draw: draw,
      /** The machines whose lanes are drawn, top to bottom. */
      setLanes: function (list) { ids = list; sizeSpacer(); },
      setWindow: function (seconds) { windowS = seconds; },
      get window() { return windowS; },
      /** Lanes and spans as shown, for tests: spans overlapping the window, oldest first. */
      snapshot: function (now) {
        const t0 = now - windowS;
        return {
          window: windowS,
          lanes: ids.map(function (id) {
            const spans = spansOf(id);
            const out = [];
            for (let k = 0; k < spans.length; k++) {
              const s = spans[k];
              const end = k + 1 < spans.length ? spans[k + 1].start : now;
              if (end < t0) continue;
              out.push({ state: s.state, start: s.start, end: end, seq: s.seq, epoch: s.epoch, data: s.data });
            }
            return { id: id, lead: leadState(id, spans), spans: out };
          }),
        };
      },
      /**
       * Where a span is drawn, in client coordinates (its lane scrolled into
       * view): {x, y} its visible part's middle, {left, right} its ends; or null.
       */
      pointOf: function (id, seq, now) {
        const i = ids.indexOf(id);
        const spans = spansOf(id);
        const k = spans.findIndex(function (s) { return s.seq === seq; });
        if (i < 0 || k < 0) return null;
        const scroll = opts.scroll;
        if (laneTop(i) < AXIS_H || laneTop(i) + LANE_H > cssH) scroll.scrollTop = i * LANE_H;
        const f = frameOf(now);
        const x0 = Math.max(f.plotL, f.x(spans[k].start));
        const x1 = Math.min(f.plotR, f.x(k + 1 < spans.length ? spans[k + 1].start : now));
        if (x1 <= x0) return null;
        const at = opts.canvas.getBoundingClientRect();
        return { x: at.left + (x0 + x1) / 2, y: at.top + laneTop(i) + LANE_H / 2, left: at.left + x0, right: at.left + x1 };
      },
    };
  };
})();
