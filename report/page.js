/* page.js - the script of index.html (kvtrace report): parses the JSON blob (#kvt-data), draws
 * the per-head heatmaps as HTML tables (value on hover, budget <select>: the recall and error
 * ones, and the kept entries of the policies that allocate) and, when Chart.js was
 * inlined, the interactive charts (curves against budget, modality retention, layer allocation).
 * Text from the results only ever goes through textContent, title and canvas text, never
 * innerHTML. At build time cmake/embed_text.cmake turns this file, without this header comment,
 * into the C array kvt_report_page_js (report_internal.h), so the page needs no file at run
 * time; the build fails if this file holds a closing script tag or an HTML comment opener.
 */
(function () {
  'use strict';
  var body = document.body;
  var nCharts = 0, nHeat = 0, nAllocHeat = 0;
  function fail(msg) {
    window.kvtErrors.push(String(msg));
    var box = document.getElementById('js-errors');
    box.hidden = false;
    box.textContent = 'Script errors:\n' + window.kvtErrors.join('\n');
    body.dataset.jsErrors = String(window.kvtErrors.length);
  }
  var D;
  try {
    D = JSON.parse(document.getElementById('kvt-data').textContent);
  } catch (e) {
    fail('report data: ' + e);
    return;
  }
  var palette = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
                 '#7f7f7f', '#bcbd22', '#17becf'];
  var stops = [[0.267, 0.005, 0.329], [0.231, 0.322, 0.545], [0.129, 0.569, 0.549],
               [0.369, 0.788, 0.384], [0.993, 0.906, 0.144]];
  function viridis(v) {
    if (!(v >= 0)) v = 0;
    if (v > 1) v = 1;
    var i = v >= 1 ? 3 : Math.floor(v * 4), t = v * 4 - i, c = [];
    for (var k = 0; k < 3; k++)
      c.push(Math.round(255 * (stops[i][k] + t * (stops[i + 1][k] - stops[i][k]))));
    return 'rgb(' + c.join(',') + ')';
  }
  function fmt(v) {
    if (v === null || v === undefined) return 'n/a';
    return Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4);
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function colorbar(vmax, label, format) {
    var w = el('div', 'cbar');
    w.appendChild(el('span', null, '0'));
    w.appendChild(el('span', 'cbar-grad'));
    w.appendChild(el('span', null, (format || fmt)(vmax) + label));
    return w;
  }
  // a heatmap table of L layers x H heads with its caption: each cell is handed to cell(td, l,
  // h, i) (i = l * H + h, the index into the page data's [L * H] grids); returns the figure
  function heatTable(caption, H, cell) {
    var fig = el('figure', 'hm'), tab = el('table', 'heat');
    fig.appendChild(el('figcaption', null, caption));
    var tr = el('tr');
    tr.appendChild(el('th', null, 'layer'));
    for (var h = 0; h < H; h++) tr.appendChild(el('th', null, String(h)));
    tab.appendChild(tr);
    for (var l = 0; l < D.heat.L; l++) {
      tr = el('tr');
      tr.appendChild(el('th', null, String(l)));
      for (h = 0; h < H; h++) {
        var td = el('td');
        cell(td, l, h, l * H + h);
        tr.appendChild(td);
      }
      tab.appendChild(tr);
    }
    fig.appendChild(tab);
    return fig;
  }
  // "KV head" or "query head" (a heads=query policy), as the PNGs' axes say
  function headName(p) {
    return D.heat.heads[p] === D.heat.kv_heads ? 'KV head' : 'query head';
  }
  // a count: whole numbers without decimals (a mean over traces may have some)
  function count(v) {
    return v !== null && v === Math.round(v) ? String(v) : fmt(v);
  }
  function heatmaps() {
    var root = document.getElementById('heatmaps');
    var sel = document.getElementById('heat-budget');
    if (!root || !sel || !D.heat) return;
    var cells = [];
    D.heat.metrics.forEach(function (hm) {
      var sec = el('div', 'hm-metric');
      sec.appendChild(el('h3', null, hm.metric + ' per layer and head'));
      var top = hm.metric.indexOf('err') === 0 ? ' or more, ' : ' ';
      sec.appendChild(colorbar(hm.vmax, top + hm.metric));
      var grid = el('div', 'hm-grid');
      D.policies.forEach(function (pol, p) {
        var fig = heatTable(pol.label, D.heat.heads[p], function (td, l, h, i) {
          cells.push({td: td, hm: hm, p: p, i: i, l: l, h: h});
        });
        fig.dataset.metric = hm.metric;
        grid.appendChild(fig);
        nHeat++;
      });
      sec.appendChild(grid);
      root.appendChild(sec);
    });
    function paint() {
      var b = +sel.value;
      cells.forEach(function (c) {
        var v = c.hm.grid[c.p][b][c.i];
        c.td.style.background = v === null ? '#d9d9d9' : viridis(v / c.hm.vmax);
        c.td.title = D.policies[c.p].label + ', budget ' + D.budgets[b] + ', layer ' + c.l +
                     ', ' + headName(c.p) + ' ' + c.h + ': ' + c.hm.metric + ' = ' + fmt(v);
      });
      body.dataset.heatBudget = String(b);
    }
    sel.addEventListener('change', paint);
    paint();
  }
  // kept entries per layer and head of the policies that allocate (D.alloc[i].head_keep[b]):
  // one table each, coloured 0..the largest count of any of them at the selected budget (of
  // those with the same kind of head), so that the tables compare
  function allocHeads() {
    var root = document.getElementById('alloc-heatmaps');
    var sel = document.getElementById('alloc-budget');
    if (!root || !sel || !D.alloc || !D.alloc.length) return;
    var tables = [];
    var grid = el('div', 'hm-grid');
    D.alloc.forEach(function (a) {
      var H = D.heat.heads[a.policy], cells = [];
      var fig = heatTable(D.policies[a.policy].label, H, function (td, l, h, i) {
        cells.push({td: td, l: l, h: h, i: i});
      });
      var bar = el('div', 'cbar-slot');
      bar.dataset.heads = headName(a.policy); /* one colour scale per kind of head */
      fig.insertBefore(bar, fig.lastChild); /* between the caption and the table */
      grid.appendChild(fig);
      tables.push({a: a, H: H, cells: cells, bar: bar});
      nAllocHeat++;
    });
    root.appendChild(grid);
    function paint() {
      var b = +sel.value, top = {};
      tables.forEach(function (t) {
        t.a.head_keep[b].forEach(function (x) {
          if (x !== null && !(x <= (top[t.H] || 0))) top[t.H] = x;
        });
      });
      tables.forEach(function (t) {
        var v = t.a.head_keep[b], vmax = top[t.H] || 0;
        t.bar.textContent = '';
        if (vmax > 0) t.bar.appendChild(colorbar(vmax, ' kept', count));
        else t.bar.appendChild(el('span', 'note', 'nothing measured at this budget'));
        t.cells.forEach(function (c) {
          var x = v[c.i], sum = 0, n = 0;
          for (var h = 0; h < t.H; h++) {
            var y = v[c.l * t.H + h];
            if (y !== null) { sum += y; n++; }
          }
          var mean = n ? sum / n : null;
          c.td.style.background = x === null || !(vmax > 0) ? '#d9d9d9' : viridis(x / vmax);
          c.td.title = D.policies[t.a.policy].label + ', budget ' + D.budgets[b] + ', layer ' +
                       c.l + ', ' + headName(t.a.policy) + ' ' + c.h + ': ' + count(x) + ' kept' +
                       (x !== null && mean ? ' (' + fmt(x / mean) + 'x the mean head)' : '');
        });
      });
      body.dataset.allocBudget = String(b);
    }
    sel.addEventListener('change', paint);
    paint();
  }
  // series k: colour k % 10, and past the palette a dash pattern and point shape of its own
  // (as the PNGs draw them), so that 50 lines differ; a reference (full, oracle) dashed
  var dashes = [[], [2, 3], [9, 3, 2, 3], [14, 4], [9, 3, 2, 3, 2, 3]];
  var points = ['circle', 'rect', 'triangle', 'rectRot', 'crossRot'];
  function dataset(label, k, data, dashed) {
    var color = palette[k % palette.length], g = Math.floor(k / palette.length) % 5;
    return {label: label, data: data, borderColor: color, backgroundColor: color,
            borderDash: dashed ? [6, 4] : dashes[g], pointStyle: points[g], showLine: true,
            pointRadius: 3, borderWidth: 2, fill: false, spanGaps: false};
  }
  function axis(text, extra) {
    var a = extra || {};
    a.title = {display: true, text: text};
    return a;
  }
  function chart(id, type, data, title, label, xAxis, yAxis) {
    var cv = document.getElementById(id);
    if (!cv) return;
    new window.Chart(cv, {type: type, data: data, options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      plugins: {title: {display: true, text: title}, tooltip: {callbacks: {label: label}}},
      scales: {x: xAxis, y: yAxis}}});
    cv.dataset.rendered = '1';
    nCharts++;
  }
  function curves() {
    D.curves.forEach(function (c) {
      // x range: the policies' points (full is a line across), widened to powers of two
      var ds = [], x0 = Infinity, x1 = -Infinity;
      for (var pass = 0; pass < 2 && !(x1 >= x0); pass++) {
        c.n_keep.forEach(function (row, p) {
          if (pass === 0 && D.policies[p].name === 'full') return;
          row.forEach(function (x) {
            if (x !== null && x > 0) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); }
          });
        });
      }
      if (x0 <= x1) {
        x0 = Math.pow(2, Math.floor(Math.log2(x0)));
        x1 = Math.max(2 * x0, Math.pow(2, Math.ceil(Math.log2(x1))));
      }
      D.policies.forEach(function (pol, p) {
        var pts = [];
        if (pol.name === 'full') {
          var v = c.value[p][0];
          if (v !== null && x0 <= x1)
            pts = [{x: x0, y: v, b: 'any'}, {x: x1, y: v, b: 'any'}];
        } else {
          D.budgets.forEach(function (bt, b) {
            var x = c.n_keep[p][b], y = c.value[p][b];
            if (x !== null && y !== null && x > 0) pts.push({x: x, y: y, b: bt});
          });
          // the line runs from the fewest kept entries to the most, whatever order the
          // budgets were given in (mixed tokens and percentages)
          pts.sort(function (u, v) { return u.x - v.x; });
        }
        if (pts.length)
          ds.push(dataset(pol.label, p, pts, pol.ref));
      });
      chart('chart-' + c.metric, 'scatter', {datasets: ds},
            c.metric + ' against budget: ' + D.model,
            function (ctx) {
              var r = ctx.raw;
              return ctx.dataset.label + ' at budget ' + r.b + ': ' + c.metric + ' = ' +
                     fmt(r.y) + ', ' + fmt(r.x) + ' kept per KV head';
            },
            axis('kept entries per KV head and layer (log scale)', {
              type: 'logarithmic', min: x0, max: x1,
              afterBuildTicks: function (ax) {  // a tick at every power of two
                var t = [];
                for (var v = x0; v <= x1 * 1.0001; v *= 2) t.push({value: v});
                ax.ticks = t;
              },
              ticks: {callback: function (v) { return String(v); }}}),
            axis(c.metric));
    });
  }
  function modality() {
    if (!D.modality) return;
    D.modality.names.forEach(function (name, m) {
      var ds = D.policies.map(function (pol, p) {  // budgets smallest first (D.order)
        var share = D.order.map(function (b) { return D.modality.share[m][p][b]; });
        return dataset(pol.label, p, share, pol.ref);
      });
      var labels = D.order.map(function (b) { return D.budgets[b]; });
      chart('chart-mod-' + name, 'line', {labels: labels, datasets: ds},
            'share of ' + name + ' tokens kept: ' + D.model,
            function (ctx) {
              return ctx.dataset.label + ' at budget ' + ctx.label + ': ' + fmt(ctx.raw) +
                     ' of ' + name + ' tokens kept';
            },
            axis('budget'), axis('share of tokens kept', {min: 0, max: 1}));
    });
  }
  function alloc() {
    var layers = [];
    for (var l = 0; l < D.heat.L; l++) layers.push(String(l));
    D.alloc.forEach(function (a) {
      var ds = D.order.map(function (b) {
        var bt = D.budgets[b];
        return dataset('budget ' + bt, b, a.keep[b], false);
      });
      chart('chart-alloc-' + a.policy, 'line', {labels: layers, datasets: ds},
            'kept entries per head by layer: ' + D.policies[a.policy].label,
            function (ctx) {
              return ctx.dataset.label + ', layer ' + ctx.label + ': ' + fmt(ctx.raw) +
                     ' kept per head';
            },
            axis('layer'), axis('mean kept entries per head', {beginAtZero: true}));
    });
  }
  try {
    heatmaps();
    allocHeads();
    if (window.Chart) {
      curves();
      modality();
      alloc();
    }
    body.dataset.chartsOk = String(nCharts);
    body.dataset.heatmapsOk = String(nHeat);
    body.dataset.allocHeatmapsOk = String(nAllocHeat);
  } catch (e) {
    fail('report script: ' + (e && e.stack ? e.stack : e));
  }
})();
