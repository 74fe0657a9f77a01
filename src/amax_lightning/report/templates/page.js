"use strict";
// amax_lightning report pages: tooltips, the colour switch of token grids, and the atlas table.
// Untrusted text (token strings, targets) is only ever set with textContent, never as markup.
(function () {
  var tooltip = document.getElementById("tooltip");
  function showTip(el) {
    tooltip.textContent = el.getAttribute("data-tip");
    tooltip.hidden = false;
    var box = el.getBoundingClientRect();
    tooltip.style.left = Math.min(box.left, window.innerWidth - 540) + "px";
    tooltip.style.top = (box.bottom + 6) + "px";
  }
  function hideTip() { tooltip.hidden = true; }
  ["mouseover", "focusin"].forEach(function (kind) {
    document.addEventListener(kind, function (event) {
      var el = event.target.closest ? event.target.closest("[data-tip]") : null;
      if (el) { showTip(el); }
    });
  });
  ["mouseout", "focusout"].forEach(function (kind) {
    document.addEventListener(kind, function (event) {
      if (event.target.closest && event.target.closest("[data-tip]")) { hideTip(); }
    });
  });

  document.querySelectorAll("input[name=colour]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      var grid = document.getElementById("token-grid");
      grid.classList.toggle("colour-optimized", radio.value === "optimized" && radio.checked);
    });
  });

  var corpusLegend = document.getElementById("corpus-legend");  // real text: the page's one scale, or its own
  document.querySelectorAll("input[name=corpus-scale]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      if (!radio.checked) { return; }
      var scale = Number(corpusLegend.getAttribute(radio.value === "own" ? "data-own" : "data-shared"));
      document.querySelectorAll("#corpus .tok[data-a]").forEach(function (tok) {
        var value = Number(tok.getAttribute("data-a"));
        tok.style.setProperty("--bg-dec", diverging(value, scale));
        tok.style.setProperty("--ink-dec", Math.abs(value) / scale > 0.6 ? "#fff" : "#111");
      });
      document.getElementById("corpus-low").textContent = fmt(-scale, 3);
      document.getElementById("corpus-high").textContent = "+" + fmt(scale, 3);
    });
  });

  // The diverging colour scale, as report_html.diverging computes it.
  var NEG = [33, 102, 172], ZERO = [255, 255, 255], POS = [178, 24, 43];
  function diverging(value, scale) {
    var t = (!scale || !isFinite(value)) ? 0 : Math.max(-1, Math.min(1, value / scale));
    var end = t > 0 ? POS : NEG;
    var rgb = ZERO.map(function (z, i) { return Math.round(z + Math.abs(t) * (end[i] - z)); });
    return "rgb(" + rgb.join(", ") + ")";
  }
  function fmt(value, digits) {
    if (value === null || value === undefined) { return "-"; }
    if (Number.isInteger(value)) { return String(value); }
    return Number(value.toPrecision(digits || 4)).toString();
  }

  var source = document.getElementById("atlas-data");
  if (!source) { return; }
  var data = JSON.parse(source.textContent);
  var PAGE = 100;
  var state = { key: 1, descending: false, filter: "", page: 0, open: new Set() };
  var keys = data.columns.map(function (column) { return column.key; });
  var P_COLUMN = keys.indexOf("null_p_value"), VERDICT_COLUMN = keys.indexOf("verdict");
  var STABLE_COLUMN = keys.indexOf("stable_since");
  var ranges = [].map.call(document.querySelectorAll("input[data-range]"), function (input) {
    return { input: input, column: keys.indexOf(input.getAttribute("data-range")),
             bound: input.getAttribute("data-bound"), factor: Number(input.getAttribute("data-factor") || 1) };
  });
  var order = data.rows.map(function (_, i) { return i; });
  var shown = order.slice();
  var body = document.querySelector("#atlas tbody");
  var headers = document.querySelectorAll("#atlas th[data-key]");
  var count = document.getElementById("atlas-count");
  var prev = document.getElementById("atlas-prev"), next = document.getElementById("atlas-next");

  function compare(a, b) {
    var x = data.rows[a][state.key], y = data.rows[b][state.key];
    if (x === null && y === null) { return a - b; }
    if (x === null) { return 1; }   // missing values last, in both directions
    if (y === null) { return -1; }
    var c = typeof x === "string" ? x.localeCompare(y) : x - y;
    return (state.descending ? -c : c) || a - b;
  }
  function number(id) {
    var value = document.getElementById(id).value;
    return value === "" ? null : Number(value);
  }
  function inRanges(row) {  // the corpus columns' ranges; a unit without a value fails any range set
    return ranges.every(function (range) {
      if (range.input.value === "") { return true; }
      var value = row[range.column], bound = Number(range.input.value);
      if (value === null) { return false; }
      return range.bound === "min" ? value * range.factor >= bound : value * range.factor <= bound;
    });
  }
  function keep(i) {  // the filters: unit number, n_unique range, p-value, settled, corpus ranges, verdict
    var row = data.rows[i], needle = state.filter.trim().toLowerCase();
    if (needle && String(row[0]).toLowerCase().indexOf(needle) !== 0) { return false; }
    var low = number("atlas-min"), high = number("atlas-max"), p = number("atlas-p");
    if (low !== null && row[1] < low) { return false; }
    if (high !== null && row[1] > high) { return false; }
    if (p !== null && (row[P_COLUMN] === null || row[P_COLUMN] > p)) { return false; }
    var settled = document.getElementById("atlas-settled").value;
    if (settled === "settled" && row[STABLE_COLUMN] === null) { return false; }
    if (settled === "changing" && row[STABLE_COLUMN] !== null) { return false; }
    if (!inRanges(row)) { return false; }
    var verdict = document.getElementById("atlas-verdict").value;
    return !verdict || row[VERDICT_COLUMN] === verdict;
  }
  function apply() {
    shown = order.filter(keep);
    shown.sort(compare);
    state.page = Math.min(state.page, Math.max(0, Math.ceil(shown.length / PAGE) - 1));
    headers.forEach(function (th) {
      var key = Number(th.getAttribute("data-key"));
      if (key === state.key) { th.setAttribute("aria-sort", state.descending ? "descending" : "ascending"); }
      else { th.removeAttribute("aria-sort"); }
    });
    draw();
  }
  function cell(row, text, numeric) {
    var td = document.createElement("td");
    td.textContent = text;
    if (numeric) { td.className = "num"; }
    row.appendChild(td);
    return td;
  }
  function token(text, value, scale, tip) {
    var tok = document.createElement("span");
    tok.className = "tok";
    tok.tabIndex = 0;
    tok.textContent = text;
    tok.style.background = diverging(value, scale);
    tok.style.color = Math.abs(value) / scale > 0.6 ? "#fff" : "#111";
    tok.setAttribute("data-tip", tip);
    return tok;
  }
  function contextsOf(unit) {  // the unit's top contexts in real text: [start, token refs, activations, max at]
    return data.corpus ? data.corpus.contexts[unit] : [];
  }
  function contextsBlock(unit, scale) {
    var block = document.createElement("div");
    block.className = "contexts";
    var title = document.createElement("div");
    title.className = "label";
    title.textContent = contextsOf(unit).length ? "top contexts in real text:" : "no context in real text";
    block.appendChild(title);
    contextsOf(unit).forEach(function (context) {
      var start = context[0], refs = context[1], acts = context[2], at = context[3];
      var line = document.createElement("div");
      line.className = "ctxrow";
      var label = document.createElement("span");
      label.className = "label";
      label.textContent = fmt(acts[at], 3);
      line.appendChild(label);
      var tokens = document.createElement("span");
      tokens.className = "tokens context";
      if (start > 0) { tokens.appendChild(document.createTextNode("…")); }
      refs.forEach(function (ref, i) {
        var position = start + i, bos = data.corpus.bos && position === 0;
        var tip = "position " + position + ": activation " + fmt(acts[i], 3) + (bos ? " (the BOS token: not counted)" : "");
        var tok = token(data.strings[ref], bos ? 0 : acts[i], scale, tip);
        if (bos) { tok.classList.add("bos"); tok.style.background = "#eee"; tok.style.color = "#666"; }
        if (i === at) { tok.classList.add("max"); }
        tokens.appendChild(tok);
      });
      if (start + refs.length < data.corpus.window) { tokens.appendChild(document.createTextNode("…")); }
      line.appendChild(tokens);
      block.appendChild(line);
    });
    return block;
  }
  function seedsRow(unit) {
    var tr = document.createElement("tr");
    tr.className = "seeds";
    var td = document.createElement("td");
    td.colSpan = data.columns.length + 1 + (data.links ? 1 : 0);
    var acts = data.activations[unit], ids = data.tokens[unit];
    var counted = acts.slice();  // one scale for the seeds' tokens and the contexts' (a BOS is not counted)
    contextsOf(unit).forEach(function (context) {
      context[2].forEach(function (value, i) {
        if (!(data.corpus.bos && context[0] + i === 0)) { counted.push(value); }
      });
    });
    var scale = Math.max.apply(null, counted.map(Math.abs)) || 1;
    data.seeds.forEach(function (seed, s) {
      var line = document.createElement("div");
      line.className = "seedrow";
      var label = document.createElement("span");
      label.className = "label";
      label.textContent = "seed " + seed;
      line.appendChild(label);
      var tokens = document.createElement("span");
      tokens.className = "tokens";
      for (var p = 0; p < data.n_tokens; p++) {
        var k = s * data.n_tokens + p, value = acts[k];
        tokens.appendChild(token(data.strings[ids[k]], value, scale,
                                 "position " + p + ": activation of the decoded token " + fmt(value, 3)));
      }
      line.appendChild(tokens);
      td.appendChild(line);
    });
    var promoted = data.promoted && data.promoted[unit];
    if (promoted) {  // the top logit effects: tokens its output direction promotes
      var effects = document.createElement("div");
      effects.className = "effects";
      effects.appendChild(document.createTextNode("promotes:"));
      promoted.forEach(function (entry) {
        var tok = document.createElement("span");
        tok.className = "tok";
        tok.tabIndex = 0;
        tok.textContent = data.strings[entry[0]];
        tok.setAttribute("data-tip", "logit effect " + fmt(entry[1], 3) + " per unit of the direction");
        effects.appendChild(tok);
      });
      td.appendChild(effects);
    }
    if (data.corpus) { td.appendChild(contextsBlock(unit, scale)); }
    tr.appendChild(td);
    return tr;
  }
  function draw() {
    var start = state.page * PAGE, stop = Math.min(shown.length, start + PAGE);
    var fragment = document.createDocumentFragment();
    for (var n = start; n < stop; n++) {
      var unit = shown[n], values = data.rows[unit];
      var tr = document.createElement("tr");
      tr.className = "unit";
      tr.setAttribute("data-unit", String(unit));
      tr.tabIndex = 0;
      var first = cell(tr, state.open.has(unit) ? "▾" : "▸", false);
      first.setAttribute("aria-hidden", "true");
      data.columns.forEach(function (column, c) {
        var text = typeof values[c] === "string" ? values[c] :
          (column.kind === "pct" && values[c] !== null ? fmt(100 * values[c], 3) + "%" : fmt(values[c], 4));
        cell(tr, text, column.kind !== "text");
      });
      if (data.links) {
        var td = cell(tr, "", false);
        var url = data.links[unit];
        if (typeof url === "string" && url.indexOf("https://www.neuronpedia.org/") === 0) {
          var a = document.createElement("a");
          a.href = url;
          a.textContent = "Neuronpedia";
          a.rel = "noopener noreferrer";
          td.appendChild(a);
        }
      }
      fragment.appendChild(tr);
      if (state.open.has(unit)) { fragment.appendChild(seedsRow(unit)); }
    }
    body.replaceChildren(fragment);
    var n = function (value) { return value.toLocaleString("en-US"); };
    count.textContent = shown.length ? ("units " + n(start + 1) + "–" + n(stop) + " of " + n(shown.length) +
      (shown.length < data.rows.length ? " (filtered from " + n(data.rows.length) + ")" : "")) : "no unit matches";
    prev.disabled = state.page === 0;
    next.disabled = stop >= shown.length;
  }
  headers.forEach(function (th) {
    th.addEventListener("click", function () {
      var key = Number(th.getAttribute("data-key"));
      state.descending = state.key === key ? !state.descending : !data.columns[key].ascending;
      state.key = key;
      state.page = 0;
      apply();
    });
  });
  document.getElementById("atlas-filter").addEventListener("input", function (event) {
    state.filter = event.target.value;
    state.page = 0;
    apply();
  });
  ["atlas-min", "atlas-max", "atlas-p", "atlas-verdict", "atlas-settled"].map(function (id) {
    return document.getElementById(id);
  }).concat(ranges.map(function (range) { return range.input; })).forEach(function (input) {
    ["input", "change"].forEach(function (kind) {
      input.addEventListener(kind, function () { state.page = 0; apply(); });
    });
  });
  prev.addEventListener("click", function () { state.page -= 1; draw(); });
  next.addEventListener("click", function () { state.page += 1; draw(); });
  function toggle(row) {
    var unit = Number(row.getAttribute("data-unit"));
    if (state.open.has(unit)) { state.open.delete(unit); } else { state.open.add(unit); }
    draw();
  }
  body.addEventListener("click", function (event) {
    if (event.target.closest("a")) { return; }
    var row = event.target.closest("tr.unit");
    if (row) { toggle(row); }
  });
  body.addEventListener("keydown", function (event) {
    var row = event.target.closest("tr.unit");
    if (row && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); toggle(row); }
  });
  apply();
})();
