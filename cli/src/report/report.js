// memwatch report: draws the page from the JSON in #memwatch-data.
// Plain DOM, SVG and canvas; nothing is loaded from anywhere.
(function () {
  'use strict';

  var D = JSON.parse(document.getElementById('memwatch-data').textContent);
  var app = document.getElementById('app');
  var tip = document.getElementById('tooltip');
  var SVGNS = 'http://www.w3.org/2000/svg';

  // ---- small helpers -------------------------------------------------------

  function el(tag, attrs) {
    var n = document.createElement(tag);
    setAttrs(n, attrs);
    for (var i = 2; i < arguments.length; i++) add(n, arguments[i]);
    return n;
  }
  function sv(tag, attrs) {
    var n = document.createElementNS(SVGNS, tag);
    setAttrs(n, attrs);
    for (var i = 2; i < arguments.length; i++) add(n, arguments[i]);
    return n;
  }
  function setAttrs(n, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === 'text') n.textContent = v;
      else if (k === 'on') Object.keys(v).forEach(function (e) { n.addEventListener(e, v[e]); });
      else n.setAttribute(k, v);
    });
  }
  function add(n, c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) { c.forEach(function (x) { add(n, x); }); return; }
    n.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  function fmtInt(n) {
    return Number(n).toLocaleString('en-US');
  }
  function plural(n, one, many) {
    return fmtInt(n) + ' ' + (n === 1 ? one : many);
  }
  function fmtBytes(n) {
    if (n < 1024) return fmtInt(n) + ' B';
    var u = ['KB', 'MB', 'GB', 'TB'], i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < u.length - 1);
    return n.toFixed(n < 10 ? 2 : 1) + ' ' + u[i];
  }
  function fmtDur(ns) {
    if (ns === null || ns === undefined) return '?';
    if (ns < 1000) return ns + ' ns';
    if (ns < 1e6) return trimNum(ns / 1e3, 3) + ' µs';
    if (ns < 1e9) return trimNum(ns / 1e6, 3) + ' ms';
    if (ns < 60e9) return trimNum(ns / 1e9, 3) + ' s';
    var s = ns / 1e9, m = Math.floor(s / 60);
    return m + ' min ' + trimNum(s - 60 * m, 1) + ' s';
  }
  function trimNum(x, digits) {
    return String(Number(x.toPrecision(Math.max(1, digits + (Math.abs(x) >= 1 ? Math.floor(Math.log10(Math.abs(x))) : 0)))));
  }
  // A value as recorded: exact (the JSON holds its shortest text).
  function fmtValue(v) {
    if (typeof v === 'string') return v;
    return String(v);
  }
  // An axis label: short.
  function fmtTick(v) {
    if (v === 0) return '0';
    var a = Math.abs(v);
    if (a >= 1e6 || a < 1e-3) return v.toExponential(1).replace('e+', 'e');
    return String(Number(v.toPrecision(4)));
  }
  function shortFile(file) {
    if (file === null || file === undefined) return '?';
    if (/^cell \[\d+\]$/.test(file)) return file;
    var parts = String(file).split('/');
    return parts[parts.length - 1];
  }
  function whereText(file, line) {
    if (file === null || file === undefined) return '?';
    if (/^cell \[\d+\]$/.test(file)) return file + ', line ' + line;
    return shortFile(file) + ':' + line;
  }
  // A tag as shown: in a run of several processes, with its process
  // (`w (pid 4243)`).
  function tagLabel(t) {
    return t.label || t.name;
  }
  function tagName(i) {
    return i === null || i === undefined ? '' : tagLabel(D.tags[i]);
  }
  // Ticks on 1/2/5 steps; `whole`: steps of at least 1 (seqs, counts).
  function niceTicks(lo, hi, count, whole) {
    if (!(hi > lo)) return [lo];
    var span = hi - lo, step = Math.pow(10, Math.floor(Math.log10(span / count)));
    var err = span / count / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    if (whole) step = Math.max(1, step);
    var out = [], t = Math.ceil(lo / step) * step;
    for (; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }
  // Nice ticks for durations in ns, on 1/2/5 steps of a time unit.
  function timeTicks(hi, count) {
    return niceTicks(0, hi, count);
  }

  // ---- tooltip -------------------------------------------------------------

  function showTip(ev, head, rows) {
    tip.textContent = '';
    if (head) tip.appendChild(el('div', { 'class': 't-head', text: head }));
    rows.forEach(function (r) {
      tip.appendChild(el('div', { 'class': 't-row' }, el('span', { text: r[0] }), el('span', { text: r[1] })));
    });
    tip.hidden = false;
    var pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    var x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + w > window.innerWidth - 4) x = ev.clientX - w - pad;
    if (y + h > window.innerHeight - 4) y = ev.clientY - h - pad;
    tip.style.left = Math.max(4, x) + 'px';
    tip.style.top = Math.max(4, y) + 'px';
  }
  function hideTip() { tip.hidden = true; }
  // The point of an SVG chart under the mouse, in its viewBox units.
  function svgPoint(svg, ev) {
    var m = svg.getScreenCTM();
    if (!m) return { x: 0, y: 0 };
    var p = svg.createSVGPoint();
    p.x = ev.clientX; p.y = ev.clientY;
    return p.matrixTransform(m.inverse());
  }

  // ---- sortable tables -----------------------------------------------------

  // cols: [{title, key(row) -> sort value, cell(row) -> node|text, num, wrap}]
  function dataTable(cols, rows, sortBy, desc) {
    var state = { by: sortBy, desc: desc, filter: '' };
    var thead = el('thead'), tbody = el('tbody');
    var table = el('table', { 'class': 'data' }, thead, tbody);
    var headRow = el('tr');
    thead.appendChild(headRow);
    cols.forEach(function (c, i) {
      var th = el('th', { 'class': (c.num ? 'num ' : '') + (c.key ? 'sortable' : ''), title: c.help || null }, c.title);
      if (c.key) th.addEventListener('click', function () {
        if (state.by === i) state.desc = !state.desc; else { state.by = i; state.desc = !!c.num; }
        draw();
      });
      headRow.appendChild(th);
    });
    function draw() {
      Array.prototype.forEach.call(headRow.children, function (th, i) {
        var old = th.querySelector('.arrow');
        if (old) th.removeChild(old);
        if (i === state.by) th.appendChild(el('span', { 'class': 'arrow', text: state.desc ? '▼' : '▲' }));
      });
      var key = cols[state.by].key;
      var shown = rows.filter(function (r) { return !state.filter || (r._text || '').indexOf(state.filter) >= 0; });
      shown.sort(function (a, b) {
        var x = key(a), y = key(b);
        var c = x < y ? -1 : x > y ? 1 : 0;
        return state.desc ? -c : c;
      });
      tbody.textContent = '';
      shown.forEach(function (r) {
        var tr = el('tr');
        cols.forEach(function (c) {
          tr.appendChild(el('td', { 'class': (c.num ? 'num' : '') + (c.wrap ? ' wrap' : '') }, c.cell(r)));
        });
        tbody.appendChild(tr);
      });
      if (!shown.length) {
        tbody.appendChild(el('tr', null, el('td', { colspan: cols.length, 'class': 'empty', text: 'nothing matches' })));
      }
    }
    draw();
    return {
      node: el('div', { 'class': 'tablewrap' }, table),
      filter: function (s) { state.filter = s.toLowerCase(); draw(); }
    };
  }
  function barCell(value, max, text) {
    var w = max > 0 ? Math.max(1, Math.round(80 * value / max)) : 0;
    return el('div', { 'class': 'barcell' }, el('span', { text: text }),
      el('div', { 'class': 'minibar-track' }, el('div', { 'class': 'minibar', style: 'width:' + w + 'px' })));
  }
  function seg(options, current, onChange) {
    var box = el('div', { 'class': 'seg' });
    options.forEach(function (o) {
      var b = el('button', { type: 'button', 'class': o[0] === current ? 'on' : null, text: o[1] });
      b.addEventListener('click', function () {
        Array.prototype.forEach.call(box.children, function (x) { x.classList.remove('on'); });
        b.classList.add('on');
        onChange(o[0]);
      });
      box.appendChild(b);
    });
    return box;
  }
  function card(id, title, lead) {
    var s = el('section', { 'class': 'card', id: id }, el('h2', { text: title }));
    if (lead) s.appendChild(el('p', { 'class': 'lead', text: lead }));
    return s;
  }

  // ---- header and run ------------------------------------------------------

  var run = D.run;
  // A run of several processes: its processes, each row saying its pid.
  var procs = run.processes || null;
  function pidText(r) {
    return r.pid === undefined || r.pid === null ? '' : String(r.pid) + (r.rank === null || r.rank === undefined ? '' : ' (rank ' + r.rank + ')');
  }
  var endingClass = run.ending.bad ? 'error' : 'ok';
  var program = run.argv.length ? run.argv.join(' ') : run.trace;

  function header() {
    return el('header', { 'class': 'top' },
      el('h1', null, el('span', { 'class': 'brand', text: 'memwatch' }), ' report'),
      el('div', { 'class': 'program', text: program }),
      el('div', { 'class': 'facts' },
        el('span', null, 'ended: ', el('span', { 'class': 'badge ' + endingClass, text: run.ending.how.replace(/_/g, ' ') })),
        el('span', null, 'ran ', el('b', { text: fmtDur(run.duration_ns) }), ' from ', el('b', { text: run.start_utc.replace('T', ' ').replace(/\.\d+Z$/, ' UTC') })),
        el('span', null, el('b', { text: fmtInt(run.changes) }), ' changes, ', el('b', { text: fmtBytes(run.bytes_changed) }), ' changed'),
        procs ? el('span', null, el('b', { text: String(run.processes_total) }), run.processes_total === 1 ? ' process' : ' processes') : null,
        el('span', null, el('b', { text: String(D.tags.length) }), D.tags.length === 1 ? ' tag' : ' tags'),
        el('span', null, 'trace ', el('b', { text: fmtBytes(run.trace_bytes) })),
        D.suspicious.length ? el('span', null, el('b', { text: String(D.suspicious.length + sum(D.more_suspicious)) }), ' suspicious') : null));
  }
  function sum(obj) {
    return Object.keys(obj).reduce(function (a, k) { return a + obj[k]; }, 0);
  }

  function nav() {
    var bad = D.suspicious.filter(function (s) { return s.severity === 'error'; }).length;
    var items = [
      ['run', 'Run', null],
      ['timeline', 'Timeline', D.timeline.tags.length],
      ['lines', 'Lines', D.lines_total],
      ['heatmaps', 'Heatmaps', D.heatmaps.length],
      ['values', 'Values', D.trajectories.length],
      ['suspicious', 'Suspicious', D.suspicious.length + sum(D.more_suspicious)],
      ['sampling', 'Sampling', D.sampled.length]
    ];
    return el('nav', { 'class': 'sections' }, items.map(function (it) {
      return el('a', { href: '#' + it[0], 'class': it[0] === 'suspicious' && bad ? 'alert' : null }, it[1],
        it[2] !== null ? el('span', { 'class': 'count', text: '(' + fmtInt(it[2]) + ')' }) : null);
    }));
  }

  function runSection() {
    var s = card('run', 'Run', 'The recorded program, how its recording ended, and what the trace holds.');
    var facts = [
      ['program', program],
      ['process', 'pid ' + run.pid + (run.python_version ? ', Python ' + run.python_version : '') +
        (procs ? ' (the first of ' + plural(run.processes_total, 'process', 'processes') + ', below)' : '')],
      ['platform', run.platform || '?'],
      ['started', run.start_utc],
      ['duration', fmtDur(run.duration_ns)],
      ['ended', null],
      ['trace', run.trace + (procs && run.processes_total > 1 ? ' and ' + plural(run.processes_total - 1, 'other trace', 'other traces') + ' (' + fmtBytes(run.trace_bytes) + ' in all, ' : ' (' + fmtBytes(run.trace_bytes) + ', ') +
        'format v' + run.format_version + ', ' + plural(run.chunks, 'chunk', 'chunks') + ')'],
      ['recorded', plural(run.changes, 'change', 'changes') + ', ' + fmtBytes(run.bytes_changed) + ' changed, ' +
        plural(run.regions_watched, 'region watched', 'regions watched') + ', ' + plural(run.checkpoints, 'checkpoint', 'checkpoints')],
      ['written by', run.writer || '?']
    ];
    run.properties.forEach(function (p) { facts.push([p[0], p[1]]); });
    if (run.lost) facts.push(['lost', plural(run.lost, 'event was not recorded', 'events were not recorded')]);
    if (run.waits) facts.push(['waited', 'the program waited ' + fmtDur(run.waited_ns) + ' for the trace writer (' + plural(run.waits, 'time', 'times') + ')']);
    if (run.note) facts.push(['note', run.note]);
    var dl = el('dl', { 'class': 'facts' });
    facts.forEach(function (f) {
      dl.appendChild(el('dt', { text: f[0] }));
      if (f[0] === 'ended') {
        dl.appendChild(el('dd', null, el('span', { 'class': 'badge ' + endingClass, text: run.ending.how.replace(/_/g, ' ') }), ' ', run.ending.message));
      } else {
        dl.appendChild(el('dd', { 'class': f[0] === 'program' || f[0] === 'trace' ? 'mono' : null, text: f[1] }));
      }
    });
    s.appendChild(dl);
    if (procs) {
      s.appendChild(el('h3', null, 'Processes', el('span', { 'class': 'sub', text: 'each process of the run and its trace; times from the run\'s start' })));
      var ptable = dataTable([
        { title: 'pid', num: true, key: function (p) { return p.pid; }, cell: function (p) { return el('span', { 'class': 'mono', text: String(p.pid) }); } },
        { title: 'rank', num: true, key: function (p) { return p.rank === null ? -1 : p.rank; }, cell: function (p) { return p.rank === null ? '' : String(p.rank); } },
        { title: 'parent', num: true, key: function (p) { return p.parent === null ? -1 : p.parent; }, cell: function (p) { return p.parent === null ? '' : String(p.parent); } },
        { title: 'trace', key: function (p) { return p.trace; }, cell: function (p) { return el('span', { 'class': 'mono', title: p.argv.join(' '), text: p.trace }); } },
        { title: 'started', num: true, key: function (p) { return p.start_ns; }, cell: function (p) { return fmtDur(p.start_ns); } },
        { title: 'duration', num: true, key: function (p) { return p.duration_ns; }, cell: function (p) { return fmtDur(p.duration_ns); } },
        { title: 'changes', num: true, key: function (p) { return p.changes; }, cell: function (p) { return fmtInt(p.changes); } },
        { title: 'bytes changed', num: true, key: function (p) { return p.bytes_changed; }, cell: function (p) { return fmtBytes(p.bytes_changed); } },
        { title: 'ended', wrap: true, key: function (p) { return p.ending.how; }, cell: function (p) {
          return el('span', null, el('span', { 'class': 'badge ' + (p.ending.bad ? 'error' : 'ok'), text: p.ending.how.replace(/_/g, ' ') }), ' ', p.ending.message);
        } }
      ], procs, 4, false);
      s.appendChild(ptable.node);
      if (procs.length < run.processes_total) {
        s.appendChild(el('p', { 'class': 'note', text: 'The first ' + fmtInt(procs.length) + ' of ' + fmtInt(run.processes_total) + ' processes are listed.' }));
      }
    }
    s.appendChild(el('h3', null, 'Tags', el('span', { 'class': 'sub', text: 'each watched buffer, tensor or object' })));
    if (!D.tags.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'No changes were recorded.' }));
      return s;
    }
    var maxChanges = Math.max.apply(null, D.tags.map(function (t) { return t.changes; }));
    var rows = D.tags.map(function (t, i) { t._i = i; return t; });
    var table = dataTable([
      { title: 'tag', key: function (t) { return tagLabel(t); }, cell: function (t) { return el('span', { 'class': 'tagname', text: tagLabel(t) }); } },
      { title: 'variable', key: function (t) { return t.variable || ''; }, cell: function (t) { return el('span', { 'class': 'mono', text: t.variable || '' }); } },
      { title: 'type', key: function (t) { return t.dtype || ''; }, cell: function (t) {
        if (!t.shape.length && !t.dtype) return t.object_changes ? 'object' : 'bytes';
        return (t.dtype || 'bytes') + ' (' + t.shape.join(', ') + (t.shape.length === 1 ? ',' : '') + ')';
      } },
      { title: 'changes', num: true, key: function (t) { return t.changes; }, cell: function (t) { return barCell(t.changes, maxChanges, fmtInt(t.changes)); } },
      { title: 'bytes changed', num: true, key: function (t) { return t.bytes; }, cell: function (t) { return fmtBytes(t.bytes); } },
      { title: 'elements changed', num: true, key: function (t) { return t.elements; }, cell: function (t) { return t.elements ? fmtInt(t.elements) : ''; } },
      { title: 'first', num: true, help: 'seq and time of the first change', key: function (t) { return t.first_seq; }, cell: function (t) { return 'seq ' + t.first_seq + ' · ' + fmtDur(t.first_ns); } },
      { title: 'last', num: true, help: 'seq and time of the last change', key: function (t) { return t.last_seq; }, cell: function (t) { return 'seq ' + t.last_seq + ' · ' + fmtDur(t.last_ns); } },
      { title: 'threads', key: function (t) { return t.threads.length; }, cell: function (t) {
        return t.threads.map(function (th) { return th[0] + ' (' + fmtInt(th[1]) + ')'; }).join(', ');
      } },
      { title: 'NaN/Inf', num: true, help: 'elements that became NaN or Inf', key: function (t) { return t.nonfinite; }, cell: function (t) {
        return t.nonfinite ? el('span', { 'class': 'badge error', text: fmtInt(t.nonfinite) }) : '';
      } }
    ], rows, 3, true);
    s.appendChild(table.node);
    return s;
  }

  // ---- timeline ------------------------------------------------------------

  function timelineSection() {
    var s = card('timeline', 'Timeline', 'Changes per tag over the run, counted in buckets; each row has its own scale (its busiest bucket is named at the right). Hover for exact counts.');
    var T = D.timeline;
    if (!T.tags.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'No changes were recorded.' }));
      return s;
    }
    var opts = { x: 'time', y: 'changes' };
    var holder = el('div');
    s.appendChild(el('div', { 'class': 'controls' },
      el('span', { text: 'x axis' }), seg([['time', 'time'], ['seq', 'seq']], 'time', function (v) { opts.x = v; draw(); }),
      el('span', { text: 'count' }), seg([['changes', 'changes'], ['bytes', 'bytes changed']], 'changes', function (v) { opts.y = v; draw(); })));
    s.appendChild(holder);
    if (T.hidden) s.appendChild(el('p', { 'class': 'note', text: plural(T.hidden, 'quieter tag is', 'quieter tags are') + ' not drawn (see Sampling).' }));
    function draw() {
      holder.textContent = '';
      var key = opts.x + '_' + opts.y;
      var n = Math.max.apply(null, T.tags.map(function (t) { return t[key].length; }).concat([1]));
      var width = opts.x === 'time' ? T.time_width : T.seq_width;
      var origin = opts.x === 'time' ? 0 : T.seq_origin;
      var L = 190, R = 90, W = 1000, rowH = 34, top = 6, plotW = W - L - R;
      var H = top + rowH * T.tags.length + 36;
      var svg = sv('svg', { 'class': 'chart', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'changes per tag over ' + opts.x });
      var bw = plotW / n;
      var ticks = opts.x === 'time' ? timeTicks(n * width, 8) : niceTicks(origin, origin + n * width, 8, true);
      var xOf = function (v) { return L + (v - origin) / (n * width) * plotW; };
      ticks.forEach(function (t) {
        var x = xOf(t);
        svg.appendChild(sv('line', { 'class': 'grid', x1: x, x2: x, y1: top, y2: top + rowH * T.tags.length }));
        svg.appendChild(sv('text', { x: x, y: top + rowH * T.tags.length + 14, 'text-anchor': 'middle', text: opts.x === 'time' ? fmtDur(t) : fmtInt(Math.round(t)) }));
      });
      svg.appendChild(sv('text', { 'class': 'axis-title', x: L + plotW / 2, y: H - 4, 'text-anchor': 'middle',
        text: opts.x === 'time' ? 'time since the ' + (procs ? 'run' : 'recording') + ' started (buckets of ' + fmtDur(width) + ')' : 'seq (buckets of ' + plural(width, 'seq', 'seqs') + ')' }));
      T.tags.forEach(function (row, r) {
        var vals = row[key], max = Math.max.apply(null, vals.concat([0]));
        var y0 = top + r * rowH;
        svg.appendChild(sv('rect', { 'class': 'rowbg', x: L, y: y0 + 2, width: plotW, height: rowH - 4 }));
        svg.appendChild(sv('text', { 'class': 'label', x: L - 8, y: y0 + rowH / 2 + 4, 'text-anchor': 'end', text: clip(tagName(row.tag), 24) },
          sv('title', { text: tagName(row.tag) })));
        svg.appendChild(sv('text', { x: L + plotW + 6, y: y0 + rowH / 2 + 4, text: 'max ' + (opts.y === 'bytes' ? fmtBytes(max) : fmtInt(max)) }));
        var d = '';
        vals.forEach(function (v, i) {
          if (!v) return;
          var h = Math.max(1.5, (rowH - 6) * v / max);
          d += 'M' + (L + i * bw).toFixed(2) + ' ' + (y0 + rowH - 3).toFixed(2) + 'h' + Math.max(0.8, bw - 0.6).toFixed(2) + 'v' + (-h).toFixed(2) + 'h' + (-Math.max(0.8, bw - 0.6)).toFixed(2) + 'z';
        });
        svg.appendChild(sv('path', { d: d || 'M0 0', fill: r % 2 ? 'var(--bar2)' : 'var(--bar)', opacity: 0.85 }));
      });
      svg.appendChild(sv('line', { 'class': 'axis', x1: L, x2: L + plotW, y1: top + rowH * T.tags.length, y2: top + rowH * T.tags.length }));
      var guide = sv('line', { 'class': 'guide', y1: top, y2: top + rowH * T.tags.length, x1: 0, x2: 0, visibility: 'hidden' });
      svg.appendChild(guide);
      svg.addEventListener('mousemove', function (ev) {
        var p = svgPoint(svg, ev);
        var i = Math.floor((p.x - L) / bw), r = Math.floor((p.y - top) / rowH);
        if (i < 0 || i >= n || r < 0 || r >= T.tags.length) { hideTip(); guide.setAttribute('visibility', 'hidden'); return; }
        var gx = L + (i + 0.5) * bw;
        guide.setAttribute('visibility', 'visible');
        guide.setAttribute('x1', gx); guide.setAttribute('x2', gx);
        var row = T.tags[r];
        var lo = origin + i * width, hi = origin + (i + 1) * width;
        var range = opts.x === 'time' ? fmtDur(lo) + ' – ' + fmtDur(hi) : 'seq ' + fmtInt(lo) + ' – ' + fmtInt(hi - 1);
        var c = row[opts.x + '_changes'][i] || 0, b = row[opts.x + '_bytes'][i] || 0;
        showTip(ev, tagName(row.tag), [[opts.x === 'time' ? 'time' : 'seqs', range], ['changes', fmtInt(c)], ['bytes changed', fmtInt(b) + ' B']]);
      });
      svg.addEventListener('mouseleave', function () { hideTip(); guide.setAttribute('visibility', 'hidden'); });
      holder.appendChild(svg);
    }
    draw();
    return s;
  }
  function clip(s, n) {
    return s.length > n ? s.slice(0, n - 1) + '…' : s;
  }

  // ---- lines ---------------------------------------------------------------

  function linesSection() {
    var s = card('lines', 'Lines', 'Which line changed what: the changes each line made to each tag, busiest first. Click a column to sort; type to filter.');
    if (!D.lines.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'No changes were recorded.' }));
      return s;
    }
    var max = Math.max.apply(null, D.lines.map(function (l) { return l.changes; }));
    var rows = D.lines.map(function (l) {
      l._where = whereText(l.file, l.line);
      l._text = (tagName(l.tag) + ' ' + (l.file || '') + ':' + l.line + ' ' + (l.function || '')).toLowerCase();
      return l;
    });
    var table = dataTable([
      { title: 'tag', key: function (l) { return tagName(l.tag); }, cell: function (l) { return el('span', { 'class': 'tagname', text: tagName(l.tag) }); } },
      { title: 'line', key: function (l) { return l._where; }, cell: function (l) { return el('span', { 'class': 'where', title: l.file ? l.file + ':' + l.line : null, text: l._where }); } },
      { title: 'function', key: function (l) { return l.function || ''; }, cell: function (l) { return el('span', { 'class': 'fn', text: l.function || '' }); } },
      { title: 'changes', num: true, key: function (l) { return l.changes; }, cell: function (l) { return barCell(l.changes, max, fmtInt(l.changes)); } },
      { title: 'bytes changed', num: true, key: function (l) { return l.bytes; }, cell: function (l) { return fmtBytes(l.bytes); } },
      { title: 'elements changed', num: true, key: function (l) { return l.elements; }, cell: function (l) { return l.elements ? fmtInt(l.elements) : ''; } },
      { title: 'first seq', num: true, key: function (l) { return l.first_seq; }, cell: function (l) { return String(l.first_seq); } },
      { title: 'last seq', num: true, key: function (l) { return l.last_seq; }, cell: function (l) { return String(l.last_seq); } },
      { title: 'threads', key: function (l) { return l.threads.join(','); }, cell: function (l) { return l.threads.join(', '); } },
      procs ? { title: 'process', num: true, key: function (l) { return l.pid; }, cell: function (l) { return pidText(l); } } : null
    ].filter(Boolean), rows, 3, true);
    var filter = el('input', { 'class': 'filter', type: 'search', placeholder: 'filter by tag, file, line or function' });
    filter.addEventListener('input', function () { table.filter(filter.value); });
    s.appendChild(el('div', { 'class': 'controls' }, filter,
      el('span', { text: D.lines.length < D.lines_total ? 'the ' + fmtInt(D.lines.length) + ' busiest of ' + fmtInt(D.lines_total) + ' (tag, line) pairs' : plural(D.lines_total, '(tag, line) pair', '(tag, line) pairs') })));
    s.appendChild(table.node);
    return s;
  }

  // ---- heatmaps ------------------------------------------------------------

  var RAMP = [[0.0, [239, 243, 255]], [0.2, [189, 215, 238]], [0.4, [107, 174, 214]], [0.6, [49, 130, 189]], [0.8, [8, 81, 156]], [1.0, [8, 38, 84]]];
  var RAMP_D = [[0.0, [255, 245, 235]], [0.25, [253, 208, 162]], [0.5, [253, 141, 60]], [0.75, [217, 72, 1]], [1.0, [127, 39, 4]]];
  function rampColor(ramp, t) {
    t = Math.max(0, Math.min(1, t));
    for (var i = 1; i < ramp.length; i++) {
      if (t <= ramp[i][0]) {
        var a = ramp[i - 1], b = ramp[i], f = (t - a[0]) / (b[0] - a[0] || 1);
        return 'rgb(' + [0, 1, 2].map(function (k) { return Math.round(a[1][k] + f * (b[1][k] - a[1][k])); }).join(',') + ')';
      }
    }
    return 'rgb(' + ramp[ramp.length - 1][1].join(',') + ')';
  }
  function rampCss(ramp) {
    return 'linear-gradient(to right,' + ramp.map(function (s) { return rampColor(ramp, s[0]) + ' ' + (s[0] * 100) + '%'; }).join(',') + ')';
  }
  // The index text of element rows [r0, r1) x cols [c0, c1) of a heatmap.
  function cellIndex(h, r0, r1, c0, c1) {
    var cols = c1 - c0 > 1 ? c0 + '–' + (c1 - 1) : String(c0);
    if (h.shape.length <= 1) return '[' + cols + ']';
    if (h.shape.length === 2) return '[' + (r1 - r0 > 1 ? r0 + '–' + (r1 - 1) : r0) + ', ' + cols + ']';
    // More dimensions: rows are the leading ones, flattened.
    var lead = h.shape.slice(0, -1);
    function unflat(r) {
      var idx = [];
      for (var d = lead.length - 1; d >= 0; d--) { idx.unshift(r % lead[d]); r = Math.floor(r / lead[d]); }
      return idx.join(', ');
    }
    return r1 - r0 > 1 ? '[' + unflat(r0) + ' … ' + unflat(r1 - 1) + ', ' + cols + ']' : '[' + unflat(r0) + ', ' + cols + ']';
  }

  function heatmapsSection() {
    var s = card('heatmaps', 'Element heatmaps', 'Which elements of each array changed, and how often or by how much (the mean |new − old| of their changes). Gray: never changed. Arrays of more than two dimensions are drawn as rows of their last dimension.');
    if (!D.heatmaps.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'No array elements changed (heatmaps are drawn for watched buffers and tensors).' }));
      return s;
    }
    var metric = 'counts';
    var grid = el('div', { 'class': 'heatgrid' });
    s.appendChild(el('div', { 'class': 'controls' }, el('span', { text: 'color' }),
      seg([['counts', 'changes per element'], ['delta', 'mean |Δ| per change']], 'counts', function (v) { metric = v; draws.forEach(function (f) { f(); }); })));
    s.appendChild(grid);
    var draws = [];
    D.heatmaps.forEach(function (h) {
      var t = D.tags[h.tag];
      var box = el('div', { 'class': 'heat' });
      box.appendChild(el('h3', null, el('span', { 'class': 'tagname', text: tagLabel(t) }),
        el('span', { 'class': 'sub', text: (t.dtype || 'bytes') + ', shape (' + h.shape.join(', ') + (h.shape.length === 1 ? ',' : '') + ')' })));
      var binned = h.cell_rows > 1 || h.cell_cols > 1;
      var changed = h.counts.filter(function (c) { return c > 0; }).length;
      box.appendChild(el('div', { 'class': 'caption', text: (binned ? 'each cell is ' + h.cell_rows + ' × ' + h.cell_cols + ' elements; ' : 'one cell per element; ') +
        plural(changed, 'cell', 'cells') + ' of ' + fmtInt(h.counts.length) + ' changed' + (h.unplaced ? '; ' + plural(h.unplaced, 'element change', 'element changes') + ' not placed (another shape under this tag)' : '') }));
      var oneD = h.grid_rows === 1;
      var px = oneD ? Math.max(1, Math.min(40, Math.floor(560 / h.grid_cols))) : Math.max(2, Math.min(28, Math.floor(400 / Math.max(h.grid_cols, h.grid_rows))));
      var cw = h.grid_cols * px, ch = oneD ? 36 : h.grid_rows * px;
      var dpr = window.devicePixelRatio || 1;
      var canvas = el('canvas', { width: Math.round(cw * dpr), height: Math.round(ch * dpr), style: 'width:' + cw + 'px;height:' + ch + 'px', role: 'img', 'aria-label': 'heatmap of ' + tagLabel(t) });
      var frame = el('div', { 'class': 'frame' },
        el('div', { 'class': 'axis-x', style: 'width:' + cw + 'px' }, el('span', { text: oneD ? '[0]' : 'col 0' }), el('span', { text: oneD ? '[' + (h.cols - 1) + ']' : 'col ' + (h.cols - 1) })),
        el('div', { 'class': 'axis-y', style: 'height:' + ch + 'px' }, el('span', { text: oneD ? '' : 'row 0' }), el('span', { text: oneD ? '' : 'row ' + (h.rows - 1) })),
        canvas);
      box.appendChild(frame);
      var legend = el('div', { 'class': 'legend' });
      box.appendChild(legend);
      grid.appendChild(box);
      // Changes per element: a cell at the edge may hold fewer elements.
      var perElement = h.counts.map(function (c, k) {
        var gy = Math.floor(k / h.grid_cols), gx = k % h.grid_cols;
        var n = (Math.min(h.rows, (gy + 1) * h.cell_rows) - gy * h.cell_rows) * (Math.min(h.cols, (gx + 1) * h.cell_cols) - gx * h.cell_cols);
        return c / Math.max(1, n);
      });
      function values() { return metric === 'counts' ? perElement : h.delta; }
      function draw() {
        var v = values(), max = 0;
        for (var i = 0; i < v.length; i++) if (v[i] > max) max = v[i];
        var ramp = metric === 'counts' ? RAMP : RAMP_D;
        var ctx = canvas.getContext('2d');
        ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        ctx.fillStyle = '#eceff3';
        ctx.fillRect(0, 0, cw, ch);
        var cellH = oneD ? ch : px;
        for (var k = 0; k < v.length; k++) {
          if (!h.counts[k]) continue;
          var x = (k % h.grid_cols) * px, y = Math.floor(k / h.grid_cols) * cellH;
          // Log scale: a few hot elements must not wash out the rest.
          var tt = max > 0 ? Math.log(1 + v[k] / max * 1000) / Math.log(1001) : 0;
          ctx.fillStyle = rampColor(ramp, 0.12 + 0.88 * tt);
          ctx.fillRect(x, y, px, cellH);
        }
        legend.textContent = '';
        add(legend, [el('span', { 'class': 'zero' }), el('span', { text: 'never' }), el('span', { text: metric === 'counts' && !binned ? '1' : fmtTick(max / 1000) }),
          el('span', { 'class': 'ramp', style: 'background:' + rampCss(ramp) }),
          el('span', { text: (metric === 'counts' ? (binned ? fmtTick(max) + ' per element' : plural(max, 'change', 'changes')) : fmtTick(max)) + ' (log scale)' })]);
      }
      canvas.addEventListener('mousemove', function (ev) {
        var b = canvas.getBoundingClientRect();
        var gx = Math.floor((ev.clientX - b.left) / b.width * h.grid_cols);
        var gy = oneD ? 0 : Math.floor((ev.clientY - b.top) / b.height * h.grid_rows);
        if (gx < 0 || gy < 0 || gx >= h.grid_cols || gy >= h.grid_rows) { hideTip(); return; }
        var k = gy * h.grid_cols + gx;
        var r0 = gy * h.cell_rows, c0 = gx * h.cell_cols;
        var r1 = Math.min(h.rows, r0 + h.cell_rows), c1 = Math.min(h.cols, c0 + h.cell_cols);
        var n = (r1 - r0) * (c1 - c0);
        showTip(ev, tagLabel(t) + cellIndex(h, r0, r1, c0, c1), [
          ['element changes', fmtInt(h.counts[k])],
          ['mean |Δ| per change', h.counts[k] ? fmtValue(h.delta[k]) : '–']
        ].concat(n > 1 ? [['elements in cell', fmtInt(n)], ['changes per element', fmtTick(h.counts[k] / n)]] : []));
      });
      canvas.addEventListener('mouseleave', hideTip);
      draws.push(draw);
      draw();
    });
    return s;
  }

  // ---- trajectories --------------------------------------------------------

  function isNum(v) { return typeof v === 'number' && isFinite(v); }

  function valuesSection() {
    var auto = !D.asked_elements;
    var s = card('values', 'Element values', auto
      ? 'The values over the run of the busiest element of each of the busiest arrays (pick others with memwatch report --element TAG:INDEX). Hover for exact values.'
      : 'The values over the run of the elements asked for with --element. Hover for exact values.');
    if (!D.trajectories.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'No element with a numeric dtype changed.' }));
      return s;
    }
    var grid = el('div', { 'class': 'trajgrid' });
    s.appendChild(grid);
    D.trajectories.forEach(function (tr) {
      var box = el('div', { 'class': 'traj' });
      box.appendChild(el('h3', null, el('span', { 'class': 'tagname', text: tr.label }),
        el('span', { 'class': 'sub', text: (D.tags[tr.tag].dtype || '') + (tr.asked ? '' : ' · picked: its busiest element') })));
      box.appendChild(el('div', { 'class': 'caption', text: plural(tr.changes, 'change', 'changes') +
        (tr.initial !== null ? ', from ' + fmtValue(tr.initial) : '') +
        (tr.points.length ? ' to ' + fmtValue(tr.points[tr.points.length - 1][2]) : '') +
        (tr.every > 1 ? '; every ' + tr.every + 'th change drawn' : '') }));
      grid.appendChild(box);
      if (!tr.points.length) {
        box.appendChild(el('p', { 'class': 'empty', text: 'This element never changed.' }));
        return;
      }
      var P = tr.points;
      var W = 600, H = 230, L = 62, R = 14, T = 12, B = 38, pw = W - L - R, ph = H - T - B;
      var finite = P.filter(function (p) { return isNum(p[2]); }).map(function (p) { return p[2]; });
      if (isNum(tr.initial)) finite.push(tr.initial);
      var ymin = finite.length ? Math.min.apply(null, finite) : 0, ymax = finite.length ? Math.max.apply(null, finite) : 1;
      if (ymin === ymax) { ymin -= Math.abs(ymin) * 0.1 || 1; ymax += Math.abs(ymax) * 0.1 || 1; }
      var pad = (ymax - ymin) * 0.06; ymin -= pad; ymax += pad;
      var xmin = P[0][0], xmax = P[P.length - 1][0];
      // Room on the left for the value it had before its first change.
      var span = Math.max(2, xmax - xmin);
      xmin -= Math.max(1, Math.round(span * 0.04));
      if (P.length === 1) xmax += 1;
      var xOf = function (x) { return L + (x - xmin) / (xmax - xmin) * pw; };
      var yOf = function (y) { return T + (1 - (y - ymin) / (ymax - ymin)) * ph; };
      var svg = sv('svg', { 'class': 'chart', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'values of ' + tr.label });
      niceTicks(ymin, ymax, 5).forEach(function (y) {
        svg.appendChild(sv('line', { 'class': 'grid', x1: L, x2: L + pw, y1: yOf(y), y2: yOf(y) }));
        svg.appendChild(sv('text', { x: L - 6, y: yOf(y) + 4, 'text-anchor': 'end', text: fmtTick(y) }));
      });
      niceTicks(xmin, xmax, 6, true).forEach(function (x) {
        svg.appendChild(sv('line', { 'class': 'grid', x1: xOf(x), x2: xOf(x), y1: T, y2: T + ph }));
        svg.appendChild(sv('text', { x: xOf(x), y: T + ph + 14, 'text-anchor': 'middle', text: fmtInt(Math.round(x)) }));
      });
      svg.appendChild(sv('line', { 'class': 'axis', x1: L, x2: L + pw, y1: T + ph, y2: T + ph }));
      svg.appendChild(sv('line', { 'class': 'axis', x1: L, x2: L, y1: T, y2: T + ph }));
      svg.appendChild(sv('text', { 'class': 'axis-title', x: L + pw / 2, y: H - 4, 'text-anchor': 'middle', text: 'seq' }));
      svg.appendChild(sv('text', { 'class': 'axis-title', x: 12, y: T + ph / 2, 'text-anchor': 'middle', transform: 'rotate(-90 12 ' + (T + ph / 2) + ')', text: 'value' }));
      // A step line: an element keeps its value until its next change.
      var d = '', pen = false, prevY = null;
      if (isNum(tr.initial)) {
        d = 'M' + L + ' ' + yOf(tr.initial).toFixed(2);
        pen = true; prevY = yOf(tr.initial);
        svg.appendChild(sv('circle', { cx: L, cy: yOf(tr.initial), r: 2.6, fill: '#fff', stroke: 'var(--accent)', 'stroke-width': 1.4 }));
      }
      P.forEach(function (p) {
        var x = xOf(p[0]);
        if (!isNum(p[2])) { pen = false; prevY = null; return; }
        var y = yOf(p[2]);
        if (pen && prevY !== null) d += 'H' + x.toFixed(2) + 'V' + y.toFixed(2);
        else d += 'M' + x.toFixed(2) + ' ' + y.toFixed(2);
        pen = true; prevY = y;
      });
      svg.appendChild(sv('path', { d: d || 'M0 0', fill: 'none', stroke: 'var(--accent)', 'stroke-width': 1.6 }));
      if (P.length <= 200) {
        P.forEach(function (p) {
          if (isNum(p[2])) svg.appendChild(sv('circle', { cx: xOf(p[0]), cy: yOf(p[2]), r: 2.2, fill: 'var(--accent)' }));
        });
      }
      P.forEach(function (p) {
        if (isNum(p[2])) return;
        var x = xOf(p[0]);
        svg.appendChild(sv('path', { d: 'M' + (x - 5) + ' ' + (T + 1) + 'h10l-5 8z', fill: 'var(--bad)' }));
      });
      if (P.some(function (p) { return !isNum(p[2]); })) {
        svg.appendChild(sv('text', { x: L + 6, y: T + 9, 'text-anchor': 'start', text: '▼ marks a change to NaN or Inf', style: 'fill:var(--bad)' }));
      }
      var dot = sv('circle', { r: 4, fill: 'none', stroke: '#1f2a3d', 'stroke-width': 1.5, cx: 0, cy: 0, visibility: 'hidden' });
      svg.appendChild(dot);
      svg.addEventListener('mousemove', function (ev) {
        var p = svgPoint(svg, ev);
        if (p.x < L - 4 || p.x > L + pw + 4) { hideTip(); return; }
        var want = xmin + (p.x - L) / pw * (xmax - xmin);
        var lo = 0, hi = P.length - 1;
        while (lo < hi) { var mid = (lo + hi) >> 1; if (P[mid][0] < want) lo = mid + 1; else hi = mid; }
        if (lo > 0 && Math.abs(P[lo - 1][0] - want) < Math.abs(P[lo][0] - want)) lo--;
        var q = P[lo];
        dot.setAttribute('visibility', 'visible');
        dot.setAttribute('cx', xOf(q[0]));
        dot.setAttribute('cy', isNum(q[2]) ? yOf(q[2]) : T + 4);
        showTip(ev, tr.label, [['seq', fmtInt(q[0])], ['time', fmtDur(q[1])], ['value', fmtValue(q[2])], ['line', D.wheres[q[3]] || '?']]);
      });
      svg.addEventListener('mouseleave', function () { hideTip(); dot.setAttribute('visibility', 'hidden'); });
      box.appendChild(svg);
    });
    return s;
  }

  // ---- suspicious ----------------------------------------------------------

  var KINDS = {
    nonfinite: 'NaN or Inf written',
    new_thread: 'new thread',
    new_line: 'new line',
    lost: 'events lost',
    crash: 'crash'
  };

  function suspiciousSection() {
    var more = sum(D.more_suspicious);
    var s = card('suspicious', 'Suspicious', 'Worth a look: NaN or Inf written into an array, a thread or line writing a tag it had not written before, events the recorder lost, and how the recording ended when it did not end normally.');
    var rows = D.suspicious.slice();
    if (procs) {
      procs.slice().reverse().forEach(function (p) {
        if (p.ending.bad) rows.unshift({ severity: 'error', kind: 'ending', tag: null, seq: null, ns: null, where: null, pid: p.pid, rank: p.rank, detail: 'the recording of ' + p.trace + ' ended: ' + p.ending.message });
      });
    } else if (run.ending.bad) {
      rows.unshift({ severity: 'error', kind: 'ending', tag: null, seq: null, ns: null, where: null, detail: 'the recording ended: ' + run.ending.message });
    }
    if (!rows.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'Nothing suspicious: no NaN or Inf was written, each tag kept its writers, and the recording closed normally.' }));
    } else {
      var order = { error: 0, warning: 1, info: 2 };
      var table = dataTable([
        { title: 'severity', key: function (r) { return order[r.severity]; }, cell: function (r) { return el('span', { 'class': 'badge ' + r.severity, text: r.severity }); } },
        { title: 'what', key: function (r) { return r.kind; }, cell: function (r) { return KINDS[r.kind] || r.kind.replace(/_/g, ' '); } },
        procs ? { title: 'process', num: true, key: function (r) { return r.pid; }, cell: function (r) { return pidText(r); } } : null,
        { title: 'tag', key: function (r) { return tagName(r.tag); }, cell: function (r) { return el('span', { 'class': 'tagname', text: tagName(r.tag) }); } },
        { title: 'seq', num: true, key: function (r) { return r.seq === null ? -1 : r.seq; }, cell: function (r) { return r.seq === null ? '' : String(r.seq); } },
        { title: 'time', num: true, key: function (r) { return r.ns === null ? -1 : r.ns; }, cell: function (r) { return r.ns === null ? '' : fmtDur(r.ns); } },
        { title: 'line', key: function (r) { return r.where === null ? '' : D.wheres[r.where]; }, cell: function (r) { return el('span', { 'class': 'where', text: r.where === null ? '' : D.wheres[r.where] }); } },
        { title: 'detail', wrap: true, key: function (r) { return r.detail; }, cell: function (r) { return r.detail; } }
      ].filter(Boolean), rows, 0, false);
      s.appendChild(table.node);
    }
    if (more) {
      s.appendChild(el('p', { 'class': 'note', text: plural(more, 'more event is', 'more events are') + ' counted but not listed: ' +
        Object.keys(D.more_suspicious).map(function (k) { return (KINDS[k] || k) + ' ' + fmtInt(D.more_suspicious[k]); }).join(', ') + '.' }));
    }
    s.appendChild(el('p', { 'class': 'note', text: 'Frozen-object violations (memwatch.frozen, action="raise") are raised in the program as MutationError; the trace records the write that caused one as an ordinary change, so it is in the lines and values above, not here.' }));
    return s;
  }

  // ---- sampling ------------------------------------------------------------

  function samplingSection() {
    var s = card('sampling', 'Sampling', 'What this page summarized to stay small. Totals (changes, bytes, elements, lines) always count every change.');
    if (!D.sampled.length) {
      s.appendChild(el('p', { 'class': 'empty', text: 'Nothing was sampled: every change is in the counts, every element in its own heatmap cell, every change of the elements drawn.' }));
    } else {
      s.appendChild(el('ul', { 'class': 'notes' }, D.sampled.map(function (x) { return el('li', { text: x }); })));
    }
    return s;
  }

  // ---- page ----------------------------------------------------------------

  document.title = 'memwatch report: ' + program;
  app.appendChild(header());
  app.appendChild(nav());
  var main = el('main');
  app.appendChild(main);
  [runSection, timelineSection, linesSection, heatmapsSection, valuesSection, suspiciousSection, samplingSection].forEach(function (f) {
    main.appendChild(f());
  });
  app.appendChild(el('footer', { text: 'memwatch ' + D.version + ' · report of ' + run.trace + ' · self-contained: this file loads nothing from the network.' }));
  document.body.setAttribute('data-ready', '1');
})();
