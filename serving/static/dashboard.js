// The dashboard: polls /v1/dashboard and /v1/leaderboard and draws small SVG charts (no libraries).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = {a: "#2f6fde", b: "#8e5bd6", tie: "#9aa3ad", both_bad: "#c2413a", up: "#1e8e5a", down: "#e0884a", ranking: "#3aa6b9", edit: "#b08a1e"};
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 220, PAD = {l: 40, r: 10, t: 10, b: 28};

  function svg(children) {
    const s = document.createElementNS(NS, "svg");
    s.setAttribute("viewBox", `0 0 ${W} ${H}`);
    s.setAttribute("preserveAspectRatio", "none");
    children.forEach((c) => s.appendChild(c));
    return s;
  }
  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function axes(yMax, yFmt, xLabels) {
    const out = [node("line", {x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, stroke: "#ccc"})];
    for (const f of [0, 0.5, 1]) {
      const y = H - PAD.b - f * (H - PAD.t - PAD.b);
      out.push(node("text", {x: 2, y: y + 4, "font-size": 11, fill: "#6a7380"}, yFmt(f * yMax)));
      out.push(node("line", {x1: PAD.l, y1: y, x2: W - PAD.r, y2: y, stroke: "#eee"}));
    }
    xLabels.forEach(([x, label]) => out.push(node("text", {x, y: H - 8, "font-size": 11, fill: "#6a7380", "text-anchor": "middle"}, label)));
    return out;
  }
  function empty(target, message) {
    const d = document.createElement("div");
    d.className = "empty";
    d.textContent = message;
    target.replaceChildren(d);
  }
  const hhmm = (t) => new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)} %`);
  const num = (x, d = 3) => (x === null || x === undefined ? "–" : (+x).toFixed(d));

  function votesChart(data) {
    const target = $("votes-chart");
    if (!data.votes.length) return empty(target, "No votes in this window yet.");
    const t0 = data.votes[0].t, t1 = data.votes[data.votes.length - 1].t + data.bucket_s;
    const max = Math.max(...data.votes.map((b) => Object.values(b.counts).reduce((a, c) => a + c, 0)));
    const xw = (W - PAD.l - PAD.r) / Math.max(1, (t1 - t0) / data.bucket_s);
    const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * (W - PAD.l - PAD.r);
    const y = (v) => (v / max) * (H - PAD.t - PAD.b);
    const bars = [];
    for (const b of data.votes) {
      let base = H - PAD.b;
      for (const [choice, count] of Object.entries(b.counts)) {
        const h = y(count);
        base -= h;
        bars.push(node("rect", {x: x(b.t), y: base, width: Math.max(1, xw - 1), height: h, fill: COLORS[choice] || "#555"}));
      }
    }
    target.replaceChildren(svg([...axes(max, (v) => (Number.isInteger(v) ? `${v}` : v.toFixed(1)), [[PAD.l + 20, hhmm(t0)], [W - PAD.r - 20, hhmm(t1)]]), ...bars]));
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const [choice, total] of Object.entries(data.votes_total)) {
      const s = document.createElement("span");
      s.innerHTML = `<i style="background:${COLORS[choice] || "#555"}"></i>`;
      s.appendChild(document.createTextNode(`${choice} ${total}`));
      legend.appendChild(s);
    }
    target.appendChild(legend);
  }

  function winRateChart(data) {
    const target = $("winrate-chart");
    const rows = data.win_rates;
    if (!rows.length) return empty(target, "No version has been compared with its parent yet.");
    const bw = (W - PAD.l - PAD.r) / rows.length;
    const y = (v) => H - PAD.b - v * (H - PAD.t - PAD.b);
    const parts = [...axes(1, pct, rows.map((r, i) => [PAD.l + (i + 0.5) * bw, `${r.model_version} (${r.judge.split(":")[0]})`]))];
    parts.push(node("line", {x1: PAD.l, x2: W - PAD.r, y1: y(0.5), y2: y(0.5), stroke: "#c2413a", "stroke-dasharray": "4 3"}));
    rows.forEach((r, i) => {
      const cx = PAD.l + (i + 0.5) * bw;
      parts.push(node("rect", {x: cx - bw * 0.3, width: bw * 0.6, y: y(r.win_rate), height: y(0) - y(r.win_rate), fill: "#2f6fde", opacity: 0.75}));
      parts.push(node("line", {x1: cx, x2: cx, y1: y(r.ci_low), y2: y(r.ci_high), stroke: "#1d232b", "stroke-width": 2}));
      parts.push(node("title", {}, `${r.model_version} vs ${r.against} by ${r.judge}: ${pct(r.win_rate)} [${pct(r.ci_low)}, ${pct(r.ci_high)}], n=${r.wins + r.ties + r.losses}`));
    });
    target.replaceChildren(svg(parts));
  }

  function rmChart(data) {
    const target = $("rm-chart");
    const pts = data.reward_model.filter((s) => s.held_out_accuracy !== null);
    if (!pts.length) return empty(target, "The reward model has not been evaluated yet.");
    const maxVotes = Math.max(1, ...pts.map((p) => p.votes_trained));
    const x = (v) => PAD.l + (v / maxVotes) * (W - PAD.l - PAD.r);
    const y = (v) => H - PAD.b - v * (H - PAD.t - PAD.b);
    const d = pts.map((p, i) => `${i ? "L" : "M"}${x(p.votes_trained)},${y(p.held_out_accuracy)}`).join(" ");
    target.replaceChildren(svg([...axes(1, pct, [[PAD.l + 30, "0 votes"], [W - PAD.r - 40, `${maxVotes} votes`]]),
      node("path", {d, fill: "none", stroke: "#1e8e5a", "stroke-width": 2})]));
  }

  function canaryPanel(panel) {
    $("canary-card").hidden = !panel;
    if (!panel) return;
    const t = panel.test;
    $("canary-title").textContent = t ? `${t.candidate} vs ${t.incumbent}: ${t.status}${t.reason ? ` (${t.reason})` : ""}, ${t.votes} votes` : "no test yet";
    const target = $("canary-chart");
    const pts = panel.trajectory;
    if (!pts.length) {
      empty(target, "No cross-version votes yet.");
    } else {
      const maxVotes = Math.max(1, pts[pts.length - 1].votes);
      const x = (v) => PAD.l + (v / maxVotes) * (W - PAD.l - PAD.r);
      const y = (v) => H - PAD.b - v * (H - PAD.t - PAD.b);
      const line = (key) => pts.map((p, i) => `${i ? "L" : "M"}${x(p.votes)},${y(p[key])}`).join(" ");
      const band = `${line("upper")} ${pts.slice().reverse().map((p) => `L${x(p.votes)},${y(p.lower)}`).join(" ")} Z`;
      const margin = t ? t.margin : 0.5;
      target.replaceChildren(svg([...axes(1, pct, [[PAD.l + 30, "0 votes"], [W - PAD.r - 40, `${maxVotes} votes`]]),
        node("path", {d: band, fill: "#2f6fde", opacity: 0.15}),
        node("line", {x1: PAD.l, x2: W - PAD.r, y1: y(margin), y2: y(margin), stroke: "#c2413a", "stroke-dasharray": "4 3"}),
        node("path", {d: line("win_rate"), fill: "none", stroke: "#2f6fde", "stroke-width": 2})]));
    }
    const decided = (t && (t.status === "promoted" || t.status === "rejected") ? [t] : []).concat(panel.decisions);
    table("canary-decisions", ["candidate", "vs", "decision", "votes", "win rate", "bounds"],
      decided.map((d) => [d.candidate, d.incumbent, `${d.status} (${d.reason})`, d.votes, pct(d.win_rate), `${pct(d.lower)} – ${pct(d.upper)}`]),
      "No test decided yet.");
  }

  function table(id, head, rows, emptyText) {
    const t = $(id);
    t.replaceChildren();
    const tr = t.insertRow();
    head.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); });
    if (!rows.length) {
      const c = t.insertRow().insertCell();
      c.colSpan = head.length;
      c.className = "empty";
      c.textContent = emptyText;
    }
    rows.forEach((r) => { const row = t.insertRow(); r.forEach((v) => { row.insertCell().textContent = v; }); });
  }

  function render(data, board) {
    $("live").textContent = data.model_version || "loading";
    $("votes-total").textContent = Object.values(data.votes_total).reduce((a, c) => a + c, 0);
    const rm = data.reward_model.filter((s) => s.held_out_accuracy !== null);
    // small held-out sets make early accuracies jumpy: say how many votes it is measured on
    $("rm-acc").textContent = rm.length ? `${pct(rm[rm.length - 1].held_out_accuracy)} (of ${rm[rm.length - 1].votes_held_out} held out)` : "–";
    $("lag").textContent = data.consumer_lag ?? "–";
    $("untrained").textContent = data.votes_untrained ?? "–";
    $("outbox").textContent = data.outbox_depth;
    const last = data.reward_model[data.reward_model.length - 1];
    $("quarantined").textContent = last ? `${last.votes_quarantined ?? 0} (${last.voters_quarantined ?? 0} voters)` : "–";
    votesChart(data);
    winRateChart(data);
    rmChart(data);
    canaryPanel(data.canary);
    table("leaderboard", ["judge", "version", "score", "95 % CI", "length-controlled", "verdicts"],
      board.data.map((r) => [r.judge, r.model_version, r.score.toFixed(0), `${r.ci_low.toFixed(0)} – ${r.ci_high.toFixed(0)}`,
        r.length_controlled_score === null ? "–" : r.length_controlled_score.toFixed(0), r.battles]),
      "No verdicts between versions yet.");
    table("rounds", ["time", "result", "version", "reward", "KL", "win rate"],
      data.rounds.slice().reverse().map((r) => [hhmm(r.ts), r.result + (r.reasons.length ? ` (${r.reasons.join(", ")})` : ""),
        r.version || "–", num(r.reward_mean), num(r.kl), pct(r.win_rate)]), "No policy round yet.");
    table("swaps", ["time", "replica", "from → to", "result", "seconds", "pause"],
      data.swaps.slice().reverse().map((s) => [hhmm(s.ts), s.replica, `${s.previous} → ${s.version}`,
        s.result + (s.reason ? ` (${s.reason})` : ""), num(s.seconds, 2), num(s.pause_s, 3)]), "No swaps yet.");
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  async function refresh() {
    try {
      const hours = $("hours").value;
      const [d, b] = await Promise.all([duetApi.call(`/v1/dashboard?hours=${hours}`), duetApi.call("/v1/leaderboard")]);
      render(await d.json(), await b.json());
      $("problem").replaceChildren();
    } catch (e) {
      const div = document.createElement("div");
      div.className = "error";
      div.textContent = e.message;
      $("problem").replaceChildren(div);
    }
  }
  $("hours").addEventListener("change", refresh);
  refresh();
  setInterval(refresh, 5000);
})();
