"use strict";
var DATA = {};
var WAITING = {};
function actcacheData(key, obj) { DATA[key] = obj; (WAITING[key] || []).forEach(function (f) { f(obj); }); delete WAITING[key]; }

var Browser = (function () {
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function load(src, key) {
    return new Promise(function (resolve, reject) {
      if (DATA[key]) return resolve(DATA[key]);
      (WAITING[key] = WAITING[key] || []).push(resolve);
      var s = document.createElement("script");
      s.src = src;
      s.onerror = function () { reject(new Error("missing data file " + src)); };
      document.head.appendChild(s);
    });
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(digits || 2);
    return x.toPrecision(digits || 3);
  }
  function pct(x) { return x === 0 ? "0" : (x * 100 < 0.001 ? (x * 100).toExponential(1) : fmt(x * 100, 3)) + "%"; }
  function vocab() { return DATA["vocab"] || null; }
  function tokText(id) {
    var v = vocab();
    var s = v && v[String(id)] !== undefined ? v[String(id)] : "#" + id;
    return s.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
  }
  function bars(counts, width, height, labels, axis) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", width); svg.setAttribute("height", height + 14);
    var max = Math.max.apply(null, counts.concat([1])), w = width / counts.length;
    counts.forEach(function (c, i) {
      var h = c ? Math.max(1, (height - 2) * c / max) : 0;
      var r = document.createElementNS(ns, "rect");
      r.setAttribute("x", i * w + 0.5); r.setAttribute("y", height - h); r.setAttribute("width", Math.max(1, w - 1));
      r.setAttribute("height", h);
      var t = document.createElementNS(ns, "title"); t.textContent = (labels ? labels[i] + ": " : "") + c; r.appendChild(t);
      svg.appendChild(r);
    });
    (axis || []).forEach(function (text, i) {
      var t = document.createElementNS(ns, "text");
      t.setAttribute("x", i ? width : 0); t.setAttribute("y", height + 12); t.setAttribute("text-anchor", i ? "end" : "start");
      t.textContent = text; svg.appendChild(t);
    });
    return svg;
  }
  function rangesText(r) {
    if (typeof r[0] === "number") r = [r];  // features.json before ranges: one [start, stop]
    var parts = r.slice(0, 3).map(function (x) { return "sequences " + x[0] + "-" + x[1]; });
    return parts.join(", ") + (r.length > 3 ? " and " + (r.length - 3) + " more ranges" : "");
  }
  function densityLabels(h) {
    return h.counts.map(function (_, i) { return "1e" + h.log10_edges[i] + " to 1e" + h.log10_edges[i + 1]; });
  }
  function fail(e) {
    var m = document.getElementById("main"), msg = String(e && e.message || e);
    m.appendChild(el("p", {cls: "err", text: msg}));
    console.error(msg);
  }

  // ------------------------------------------------------------------------------ index page
  function start() { if (!vocab()) document.body.classList.add("novocab"); }
  function index() {
    start();
    var f = DATA["features"];
    var main = document.getElementById("main");
    main.appendChild(el("p", {id: "tokens-read", text: f.n_tokens + " tokens of " + f.store + " (" + f.range + ": " +
      rangesText(f.sequences) + "; " + f.training_sequences + " training and " + f.held_out_sequences +
      " held-out sequences), top " + f.top + " examples per latent"}));
    var head = ["SAE", "hook", "architecture", "d_sae", "L0", "dead", "train L0", "train FVU", "flags",
                "latent density (log10)"];
    var t = el("table", {id: "saes"}, [el("tr", {}, head.map(function (h, i) { return el("th", {cls: i < 3 ? "l" : "", text: h}); }))]);
    f.saes.forEach(function (s) {
      var m = s.training_metrics || {};
      var cell = el("td", {}, [bars(s.density_histogram.counts, 160, 36, densityLabels(s.density_histogram), ["1e-8", "1"]),
                              el("div", {cls: "muted", text: s.density_histogram.dead + " dead"})]);
      t.appendChild(el("tr", {}, [
        el("td", {cls: "l"}, [el("a", {href: "sae-" + s.folder.split("/").pop() + ".html", text: s.name})]),
        el("td", {cls: "l", text: s.hook}), el("td", {cls: "l", text: s.architecture}), el("td", {text: s.d_sae}),
        el("td", {text: fmt(s.l0)}), el("td", {text: pct(s.dead_fraction)}), el("td", {text: fmt(m.l0)}),
        el("td", {text: fmt(m.fvu)}), el("td", {cls: "l flags", text: (s.flags || []).join("; ")}), cell]));
    });
    main.appendChild(t);
  }

  // ------------------------------------------------------------------------------ SAE page
  var S = null, L = null, page = 0, order = null, PER_PAGE = 100;
  function sae(name) {
    start();
    var f = DATA["features"];
    S = f.saes.filter(function (s) { return s.name === name; })[0];
    L = DATA[S.folder.split("/").pop() + "/latents"];
    document.title = S.name + " - actcache features";
    var main = document.getElementById("main");
    main.appendChild(el("p", {text: S.hook + " · " + S.architecture + " · d_sae " + S.d_sae + " · L0 " + fmt(S.l0) +
      " · dead " + pct(S.dead_fraction) + (S.logit_effects ? "" : " · no logit effects")}));
    if (S.flags && S.flags.length)
      main.appendChild(el("p", {cls: "err flags", text: "degenerate: " + S.flags.join("; ") + " (rule: docs/flags.md)"}));
    main.appendChild(bars(S.density_histogram.counts, 320, 50, densityLabels(S.density_histogram), ["density 1e-8", "1"]));
    var idIn = el("input", {id: "latent-id", type: "number", min: 0, max: S.d_sae - 1, placeholder: "0-" + (S.d_sae - 1)});
    var tokIn = el("input", {id: "token-q", type: "text", placeholder: "a token, e.g. ' the'"});
    var sortSel = el("select", {id: "sort"}, [el("option", {value: "id", text: "by id"}),
      el("option", {value: "density", text: "by density"}), el("option", {value: "max", text: "by max activation"})]);
    idIn.addEventListener("keydown", function (e) { if (e.key === "Enter") location.hash = "latent=" + idIn.value; });
    tokIn.addEventListener("keydown", function (e) { if (e.key === "Enter") location.hash = "token=" + encodeURIComponent(tokIn.value); });
    sortSel.addEventListener("change", function () { page = 0; order = null; list(); });
    main.appendChild(el("div", {cls: "controls"}, [
      el("label", {}, ["Latent ", idIn, " ", el("button", {id: "go", text: "open"})]),
      el("label", {}, ["Latents firing on token ", tokIn, " ", el("button", {id: "find", text: "find"})]),
      el("label", {}, ["List ", sortSel])]));
    document.getElementById("go").onclick = function () { location.hash = "latent=" + idIn.value; };
    document.getElementById("find").onclick = function () { location.hash = "token=" + encodeURIComponent(tokIn.value); };
    main.appendChild(el("div", {id: "view"}));
    main.appendChild(el("h2", {text: "Latents"}));
    main.appendChild(el("div", {id: "list"}));
    window.addEventListener("hashchange", route);
    list();
    route();
  }
  function route() {
    var h = location.hash.slice(1);
    try { h = decodeURIComponent(h); } catch (e) { /* a malformed escape (e.g. #token=%E0%A4%A): use the text as typed */ }
    var view = document.getElementById("view");
    view.innerHTML = "";
    if (h.indexOf("latent=") === 0) card(parseInt(h.slice(7), 10), view);
    else if (h.indexOf("token=") === 0) tokenSearch(h.slice(6), view);
  }
  function list() {
    var box = document.getElementById("list");
    box.innerHTML = "";
    var n = S.d_sae, by = document.getElementById("sort").value;
    if (!order) {
      order = Array.from({length: n}, function (_, i) { return i; });
      if (by === "density") order.sort(function (a, b) { return L.density[b] - L.density[a] || a - b; });
      if (by === "max") order.sort(function (a, b) { return L.max_act[b] - L.max_act[a] || a - b; });
    }
    var pages = Math.ceil(n / PER_PAGE);
    var t = el("table", {}, [el("tr", {}, ["latent", "density", "max act.", "mean act.", "top token"].map(function (h) { return el("th", {text: h}); }))]);
    order.slice(page * PER_PAGE, (page + 1) * PER_PAGE).forEach(function (i) {
      var tr = el("tr", {cls: "pick"}, [el("td", {text: i}), el("td", {text: pct(L.density[i])}), el("td", {text: fmt(L.max_act[i])}),
        el("td", {text: fmt(L.mean_act[i])}), el("td", {cls: "l", text: L.top_token[i] === null ? "" : tokText(L.top_token[i])})]);
      tr.onclick = function () { location.hash = "latent=" + i; window.scrollTo(0, 0); };
      t.appendChild(tr);
    });
    var prev = el("button", {text: "previous"}), next = el("button", {text: "next"});
    prev.disabled = page === 0; next.disabled = page >= pages - 1;
    prev.onclick = function () { page--; list(); }; next.onclick = function () { page++; list(); };
    box.appendChild(el("div", {cls: "controls"}, [prev, "page " + (page + 1) + " of " + pages, next]));
    box.appendChild(t);
  }
  function tokenSearch(q, view) {
    var v = vocab(), ids = [];
    var match = function (s) { return s === q; };
    var ci = function (s) { return s.trim().toLowerCase() === q.trim().toLowerCase(); };
    [match, ci].forEach(function (m) {
      if (ids.length) return;
      if (v) for (var k in v) { if (m(v[k]) && L.token_latents[k]) ids.push(k); }
      if (/^#?\d+$/.test(q.trim()) && L.token_latents[q.trim().replace("#", "")]) ids.push(q.trim().replace("#", ""));
    });
    view.appendChild(el("h2", {text: "Latents firing on " + JSON.stringify(q)}));
    if (!ids.length) { view.appendChild(el("p", {id: "token-results", cls: "muted", text: "no latent has it among its top-activating tokens"})); return; }
    var ul = el("ul", {id: "token-results"});
    ids.forEach(function (k) {
      L.token_latents[k].slice(0, 200).forEach(function (i) {
        var a = el("a", {href: "#latent=" + i, text: "latent " + i});
        ul.appendChild(el("li", {}, [a, " · token " + JSON.stringify(tokText(k)) + " · max " + fmt(L.max_act[i]) + " · density " + pct(L.density[i])]));
      });
    });
    view.appendChild(ul);
  }
  function context(ex, maxAct) {
    var line = el("div", {cls: "ctx"}, [el("span", {cls: "val", text: fmt(ex.act)})]);
    ex.tokens.forEach(function (t, j) {
      var s = el("span", {cls: "tok", text: tokText(t)});
      if (j === ex.at) {
        var a = maxAct > 0 ? Math.min(1, ex.act / maxAct) : 0;
        s.className = "tok act";
        s.style.background = "rgba(255, 112, 0, " + (0.15 + 0.85 * a).toFixed(3) + ")";
        s.title = "activation " + ex.act + " (" + (100 * a).toFixed(0) + "% of max) · sequence " + ex.seq + ", position " + ex.pos + " · token id " + t;
      } else {
        s.title = "token id " + t;
      }
      line.appendChild(s);
    });
    return line;
  }
  function card(id, view) {
    if (!(id >= 0 && id < S.d_sae)) { view.appendChild(el("p", {cls: "err", text: "no latent " + id + " (0-" + (S.d_sae - 1) + ")"})); return; }
    var f = DATA["features"], folder = S.folder.split("/").pop(), b = Math.floor(id / f.block);
    var name = String(b); while (name.length < 5) name = "0" + name;
    load(S.folder + "/blocks/" + name + ".js", folder + "/" + b).then(function (block) {
      var r = block.latents[id - block.start];
      var c = el("div", {cls: "card", id: "card", "data-latent": id});
      c.appendChild(el("h2", {text: "Latent " + id}));
      c.appendChild(el("div", {cls: "stats"}, [
        el("span", {text: "density " + pct(r.density) + " (" + r.n_fired + " of " + f.n_tokens + " tokens)"}),
        el("span", {text: "mean activation " + fmt(r.mean_act) + " when firing"}), el("span", {text: "max " + fmt(r.max_act)})]));
      if (!r.n_fired) { c.appendChild(el("p", {cls: "muted", text: "never fired on these tokens"})); view.appendChild(c); return; }
      var nb = r.histogram.counts.length, lab = r.histogram.counts.map(function (_, i) {
        return fmt(r.histogram.max * i / nb) + " to " + fmt(r.histogram.max * (i + 1) / nb); });
      var cols = el("div", {cls: "cols"}, [el("div", {}, [el("h3", {text: "Activations when firing"}), bars(r.histogram.counts, 320, 60, lab, ["0", fmt(r.histogram.max)])])]);
      if (r.top_tokens.length) {
        cols.appendChild(el("div", {}, [el("h3", {text: "Top activating tokens"}), el("ol", {id: "top-tokens"}, r.top_tokens.map(function (tc) {
          return el("li", {text: JSON.stringify(tokText(tc[0])) + " × " + tc[1]}); }))]));
      }
      if (r.logits) {
        ["positive", "negative"].forEach(function (k) {
          cols.appendChild(el("div", {}, [el("h3", {text: (k === "positive" ? "Promoted" : "Suppressed") + " tokens (W_dec·W_U)"}),
            el("ol", {cls: k === "positive" ? "pos" : "neg", id: "logits-" + k}, r.logits[k].map(function (tv) {
              return el("li", {text: JSON.stringify(tokText(tv[0])) + " " + fmt(tv[1])}); }))]));
        });
      }
      c.appendChild(cols);
      c.appendChild(el("h3", {text: "Top activations"}));
      var top = el("div", {id: "top"});
      r.top.forEach(function (ex) { top.appendChild(context(ex, r.max_act)); });
      c.appendChild(top);
      r.quantiles.forEach(function (q) {
        c.appendChild(el("h3", {text: "Activations " + fmt(q.lo) + " to " + fmt(q.hi) + " (" + q.n + " tokens; a random sample)"}));
        q.examples.forEach(function (ex) { c.appendChild(context(ex, r.max_act)); });
      });
      view.appendChild(c);
    }).catch(fail);
  }
  return {index: index, sae: sae};
})();
