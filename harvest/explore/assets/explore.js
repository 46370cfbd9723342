"use strict";
// The explorer page: every panel asks the server (api/...), which runs the model; nothing from the network.
var INFO = null;

function el(tag, attrs, children) {
  var e = document.createElement(tag);
  for (var k in (attrs || {})) {
    if (k === "text") e.textContent = attrs[k];
    else if (k === "cls") e.className = attrs[k];
    else e.setAttribute(k, attrs[k]);
  }
  (children || []).forEach(function (c) {
    if (c !== null && c !== undefined) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  });
  return e;
}

function fmt(x, digits) {
  if (x === null || x === undefined) return "";
  if (typeof x !== "number") return String(x);
  if (x === 0) return "0";
  var a = Math.abs(x);
  if (a >= 1e4 || a < 1e-3) return x.toExponential(digits || 2);
  return x.toPrecision(digits || 3);
}

function sae() { return document.getElementById("sae").value; }

// One request; errors (a message from the server, or none at all) are shown in the panel's .err line.
function call(panel, method, url, body) {
  var err = panel.querySelector(".err"), busy = panel.querySelector(".busy");
  err.textContent = "";
  if (busy) busy.hidden = false;
  var opts = {method: method, headers: {"Content-Type": "application/json"}};
  if (body !== undefined) opts.body = JSON.stringify(body);
  return fetch(url, opts).then(function (r) {
    return r.json().catch(function () { return {error: "the server answered " + r.status + " without JSON"}; })
      .then(function (data) {
        if (!r.ok || data.error) throw new Error(data.error || ("the server answered " + r.status));
        return data;
      });
  }, function () {
    throw new Error("no answer from the explore server: is it still running?");
  }).finally(function () { if (busy) busy.hidden = true; }).catch(function (e) {
    err.textContent = e.message;
    throw e;
  });
}

function context(c) {
  // a top context: its tokens, the activating one marked
  var line = el("span", {cls: "ctx", title: "activation " + c.act + " (sequence " + c.seq + ", position " + c.pos + ")"});
  line.appendChild(el("span", {cls: "muted", text: fmt(c.act) + "  "}));
  c.tokens.forEach(function (t, i) { line.appendChild(el("span", {cls: i === c.at ? "hit" : "", text: t})); });
  return line;
}

function latentLink(id) {
  var a = el("a", {cls: "latent", href: "#latent=" + id, "data-latent": String(id), text: String(id)});
  a.addEventListener("click", function (ev) { ev.preventDefault(); openCard(id); });
  return a;
}

// ---------------------------------------------------------------- info
function loadInfo() {
  return fetch("api/info").then(function (r) { return r.json(); }).then(function (info) {
    INFO = info;
    document.getElementById("model").textContent = "model " + info.model + " (" + info.n_ctx + "-token context)";
    var sel = document.getElementById("sae");
    sel.innerHTML = "";
    info.saes.forEach(function (s) { sel.appendChild(el("option", {value: s.name, text: s.name})); });
    sel.addEventListener("change", showSae);
    document.getElementById("steer-tokens").max = info.max_new_tokens;
    showSae();
  });
}

function current() {
  return INFO.saes.filter(function (s) { return s.name === sae(); })[0];
}

function showSae() {
  var s = current();
  document.getElementById("sae-info").textContent = s.hook + ", " + s.d_sae + " latents (" + s.architecture + ")";
  var link = document.getElementById("browser-link");
  link.hidden = !s.browser;
  if (s.browser) link.href = s.browser;
  var notice = document.getElementById("notice");
  notice.hidden = !s.problem;
  notice.textContent = s.problem ? "No top contexts or latent cards: " + s.problem + " (then restart explore)." : "";
}

// ---------------------------------------------------------------- prompt -> top latents
var TOP = null;

function runPrompt(ev) {
  ev.preventDefault();
  var panel = document.getElementById("prompt-panel");
  call(panel, "POST", "api/top_features", {sae: sae(), text: document.getElementById("prompt").value,
                                          k: document.getElementById("k").value}).then(function (data) {
    TOP = data;
    var box = document.getElementById("tokens");
    box.innerHTML = "";
    data.tokens.forEach(function (t, i) {
      var chip = el("span", {cls: "tok" + (t.special ? " special" : ""), "data-position": String(i), text: t.token,
                             title: t.latents.length + " latents shown"});
      chip.addEventListener("click", function () { showToken(i); });
      box.appendChild(chip);
    });
    var last = data.tokens.length - 1;
    showToken(last);
  }, function () {});
}

function showToken(i) {
  var t = TOP.tokens[i];
  document.querySelectorAll("#tokens .tok").forEach(function (c) {
    c.classList.toggle("sel", Number(c.getAttribute("data-position")) === i);
  });
  var out = document.getElementById("token-latents");
  out.innerHTML = "";
  out.appendChild(el("h3", {text: "token " + i + " " + JSON.stringify(t.token) + (t.special ? " (special)" : "")}));
  if (TOP.note) out.appendChild(el("p", {cls: "note muted", text: TOP.note}));
  if (!t.latents.length) { out.appendChild(el("p", {cls: "muted", text: "no latent fires on this token"})); return; }
  var rows = t.latents.map(function (h) {
    return el("tr", {cls: "hit-row"}, [el("td", {}, [latentLink(h.latent)]), el("td", {text: fmt(h.activation)}),
      el("td", {text: h.density === null ? "" : fmt(h.density)}), el("td", {text: fmt(h.max_act)}),
      el("td", {cls: "l"}, h.contexts.map(context))]);
  });
  out.appendChild(el("table", {id: "latents-table"}, [el("tr", {}, [el("th", {text: "latent"}), el("th", {text: "activation"}),
    el("th", {text: "density"}), el("th", {text: "max act"}), el("th", {cls: "l", text: "top contexts"})])].concat(rows)));
}

// ---------------------------------------------------------------- latent card
function openCard(id) {
  document.getElementById("card-latent").value = id;
  document.getElementById("steer-latent").value = id;
  var panel = document.getElementById("card-panel");
  return call(panel, "GET", "api/latent?sae=" + encodeURIComponent(sae()) + "&latent=" + encodeURIComponent(id))
    .then(showCard, function () { document.getElementById("card").innerHTML = ""; });
}

function showCard(r) {
  var card = document.getElementById("card");
  card.innerHTML = "";
  card.setAttribute("data-latent", String(r.id));
  var s = current();
  card.appendChild(el("h3", {}, ["latent " + r.id + " of " + r.sae + " ",
    s.browser ? el("a", {href: s.browser + "#latent=" + r.id, target: "_blank", text: "(in the feature browser)"}) : null]));
  card.appendChild(el("div", {cls: "stats"}, [
    el("span", {text: "density " + fmt(r.density)}), el("span", {text: "max act " + fmt(r.max_act)}),
    el("span", {text: "mean act " + fmt(r.mean_act)}), el("span", {text: "fired " + r.n_fired + " times"})]));
  if (r.top_tokens && r.top_tokens.length)
    card.appendChild(el("p", {}, ["top tokens: " + r.top_tokens.map(function (p) { return JSON.stringify(p[0]) + " x" + p[1]; }).join(", ")]));
  if (r.logits) {
    var side = function (pairs, cls) { return el("td", {cls: "l " + cls}, [pairs.map(function (p) { return JSON.stringify(p[0]) + " " + fmt(p[1]); }).join("  ")]); };
    card.appendChild(el("table", {}, [el("tr", {}, [el("th", {text: "promotes"}), side(r.logits.positive, "pos")]),
                                      el("tr", {}, [el("th", {text: "suppresses"}), side(r.logits.negative, "neg")])]));
  }
  card.appendChild(el("h3", {text: r.top.length ? "top contexts" : "never fired on the tokens read"}));
  var list = el("div", {id: "card-top"});
  r.top.forEach(function (c) { list.appendChild(context(c)); });
  card.appendChild(list);
}

function cardForm(ev) {
  ev.preventDefault();
  openCard(document.getElementById("card-latent").value.trim());
}

// ---------------------------------------------------------------- steering
function runSteer(ev) {
  ev.preventDefault();
  var panel = document.getElementById("steer-panel");
  var body = {sae: sae(), prompt: document.getElementById("steer-prompt").value,
              latent: document.getElementById("steer-latent").value.trim(),
              strength: document.getElementById("steer-strength").value.trim(),
              tokens: document.getElementById("steer-tokens").value,
              positions: document.getElementById("steer-positions").value};
  document.getElementById("steered").textContent = "";
  document.getElementById("plain").textContent = "";
  call(panel, "POST", "api/steer", body).then(function (r) {
    document.getElementById("steered-head").textContent = "steered (latent " + r.feature + " x " + r.strength + ", " + r.positions + " positions)";
    document.getElementById("steered").textContent = r.steered_text;
    document.getElementById("plain").textContent = r.plain_text;
    panel.setAttribute("data-seconds", String(r.seconds));
  }, function () {});
}

// ---------------------------------------------------------------- attribution
function runAttr(ev) {
  ev.preventDefault();
  var panel = document.getElementById("attr-panel");
  call(panel, "POST", "api/attribute", {sae: sae(), prompt: document.getElementById("attr-prompt").value,
                                        target: document.getElementById("attr-target").value}).then(function (r) {
    var out = document.getElementById("attribution");
    out.innerHTML = "";
    out.appendChild(el("p", {text: "logit of " + JSON.stringify(r.target) + " after " + JSON.stringify(r.token) + ": " + fmt(r.logit, 4) +
      " = latents " + fmt(r.features_total, 4) + " + remainder " + fmt(r.remainder, 4)}));
    out.appendChild(el("p", {cls: "muted", text: "remainder: " + Object.keys(r.remainder_terms).map(function (k) { return k + " " + fmt(r.remainder_terms[k], 3); }).join(", ")}));
    var rows = r.top.map(function (t) {
      return el("tr", {}, [el("td", {}, [latentLink(t.latent)]), el("td", {text: fmt(t.activation)}),
        el("td", {cls: t.contribution >= 0 ? "pos" : "neg", text: fmt(t.contribution, 4)})]);
    });
    out.appendChild(el("table", {}, [el("tr", {}, [el("th", {text: "latent"}), el("th", {text: "activation"}),
      el("th", {text: "contribution"})])].concat(rows)));
  }, function () {});
}

document.addEventListener("DOMContentLoaded", function () {
  document.getElementById("prompt-form").addEventListener("submit", runPrompt);
  document.getElementById("card-form").addEventListener("submit", cardForm);
  document.getElementById("steer-form").addEventListener("submit", runSteer);
  document.getElementById("attr-form").addEventListener("submit", runAttr);
  loadInfo().then(function () {
    var m = /latent=(\d+)/.exec(location.hash);
    if (m) openCard(Number(m[1]));
    document.body.setAttribute("data-ready", "1");
  }, function () {
    document.getElementById("notice").hidden = false;
    document.getElementById("notice").textContent = "no answer from the explore server: is it still running?";
  });
});
