// The chat page: streams answers from /v1/chat/completions; when the server returns K answers to
// compare (K = 2..9), shows them side by side with vote buttons (K = 2) or ranks (K > 2) that POST
// /v1/feedback; any answer the user was shown has an "Edit" action that sends their rewrite.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const log = $("log"), form = $("composer"), prompt = $("prompt"), sendBtn = $("send");
  const keyInput = $("api-key"), pairsSelect = $("pairs"), kSelect = $("k");
  const LETTERS = "ABCDEFGHI";
  let messages = [];           // the conversation sent with each request
  let pendingChoice = null;    // a comparison awaiting a vote: its answers, to continue with the chosen one
  let modelName = null;

  keyInput.value = duetApi.key();
  keyInput.addEventListener("change", () => { duetApi.setKey(keyInput.value); modelName = null; });
  pairsSelect.value = localStorage.getItem("duet-pairs") || "allow";
  pairsSelect.addEventListener("change", () => localStorage.setItem("duet-pairs", pairsSelect.value));
  kSelect.value = localStorage.getItem("duet-k") || "2";
  kSelect.addEventListener("change", () => localStorage.setItem("duet-k", kSelect.value));
  $("new-chat").addEventListener("click", () => { messages = []; pendingChoice = null; log.replaceChildren(); });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });

  function el(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function showError(container, message) {
    container.appendChild(el("div", "error", message));
    log.scrollTop = log.scrollHeight;
  }

  async function model() {
    if (!modelName) {
      const resp = await duetApi.call("/v1/models");
      modelName = (await resp.json()).data[0].id;
    }
    return modelName;
  }

  // Server-sent events, as OpenAI streams them: "data: {json}\n\n" ... "data: [DONE]".
  async function* sse(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function answerBoxes(turn, k) {
    const grid = el("div", `answers k${k}`);
    const boxes = [];
    for (let i = 0; i < k; i++) {
      const box = el("div", "answer");
      if (k > 1) box.appendChild(el("h3", "", `Answer ${LETTERS[i]}`));
      const bubble = el("div", "bubble");
      box.appendChild(bubble);
      box.dataset.index = i;
      grid.appendChild(box);
      boxes.push({box, bubble, text: ""});
    }
    turn.appendChild(grid);
    return boxes;
  }

  async function vote(turn, body, buttons) {
    buttons.forEach((b) => (b.disabled = true));
    try {
      await duetApi.call("/v1/feedback", {method: "POST", body: JSON.stringify(body)});
      turn.querySelector(".votes").appendChild(el("span", "muted vote-recorded", "Thanks, your vote is recorded."));
      return true;
    } catch (e) {
      buttons.forEach((b) => (b.disabled = false));
      showError(turn, `Vote not recorded: ${e.message}`);
      return false;
    }
  }

  // "Edit" under an answer: the user's rewrite goes to /v1/feedback as a demonstration (and is preferred to
  // the answer it replaces); the conversation then continues with it.
  function editAction(turn, boxes, index, duet) {
    const b = boxes[index];
    const button = el("button", "edit-action", "Edit");
    button.type = "button";
    button.addEventListener("click", () => {
      const area = el("textarea", "edit");
      area.value = b.text;
      const save = el("button", "primary", "Send edit"), cancel = el("button", "", "Cancel");
      save.type = cancel.type = "button";
      const bar = el("div", "votes edit-bar");
      bar.append(save, cancel);
      b.bubble.replaceWith(area);
      button.replaceWith(bar);
      const close = () => { area.replaceWith(b.bubble); bar.replaceWith(button); };
      cancel.addEventListener("click", close);
      save.addEventListener("click", async () => {
        const id = duet.comparison_id ? {comparison_id: duet.comparison_id} : {completion_id: duet.completion_id};
        const body = {...id, vote_token: duet.vote_token, edited_answer: area.value};
        if (duet.comparison_id) body.answer_index = index;
        save.disabled = true;
        try {
          await duetApi.call("/v1/feedback", {method: "POST", body: JSON.stringify(body)});
        } catch (e) {
          save.disabled = false;
          showError(turn, `Edit not recorded: ${e.message}`);
          return;
        }
        b.text = area.value.trim();
        b.bubble.textContent = b.text;
        b.box.classList.add("edited");
        area.replaceWith(b.bubble);
        bar.replaceWith(el("span", "muted edit-recorded", "Edit recorded."));
        boxes.forEach((x) => x.box.querySelectorAll(".edit-action").forEach((n) => n.remove()));  // one per answer set
        const last = messages[messages.length - 1];
        if (pendingChoice && pendingChoice.turn === turn) continueWith(turn, boxes, index);
        else if (boxes.length === 1 && last && last.role === "assistant") last.content = b.text;
      });
    });
    b.box.appendChild(button);
  }

  function continueWith(turn, boxes, index) {
    boxes.forEach((b, i) => b.box.classList.toggle("chosen", i === index));
    if (pendingChoice && pendingChoice.turn === turn) {
      messages.push({role: "assistant", content: boxes[index].text});
      pendingChoice = null;
    }
  }

  function comparisonVotes(turn, boxes, duet) {
    const bar = el("div", "votes");
    turn.appendChild(bar);
    const k = boxes.length;
    if (k === 2) {
      const options = [["a", "A is better", 0], ["b", "B is better", 1], ["tie", "Tie", 0], ["both_bad", "Both are bad", 0]];
      const buttons = options.map(([choice, label, keep]) => {
        const b = el("button", "", label);
        b.type = "button";
        b.dataset.choice = choice;
        b.addEventListener("click", async () => {
          if (await vote(turn, {comparison_id: duet.comparison_id, vote_token: duet.vote_token, choice}, buttons)) {
            continueWith(turn, boxes, keep);
          }
        });
        bar.appendChild(b);
        return b;
      });
      return;
    }
    // K > 2: a rank per answer (equal ranks are ties), sent best first.
    const selects = boxes.map((_, i) => {
      const s = el("select");
      for (let r = 1; r <= k; r++) s.appendChild(new Option(`${r}`, `${r}`, false, r === i + 1));
      const label = el("label", "ranking", `${LETTERS[i]}: rank `);
      label.appendChild(s);
      bar.appendChild(label);
      return s;
    });
    const submit = el("button", "primary", "Send ranking");
    submit.type = "button";
    submit.addEventListener("click", async () => {
      const ranks = selects.map((s) => +s.value);
      const groups = [...new Set(ranks)].sort((a, b) => a - b)
        .map((r) => ranks.flatMap((x, i) => (x === r ? [i] : [])));
      const ranking = groups.map((g) => (g.length === 1 ? g[0] : g));
      if (await vote(turn, {comparison_id: duet.comparison_id, vote_token: duet.vote_token, ranking}, [submit, ...selects])) {
        continueWith(turn, boxes, groups[0][0]);
      }
    });
    bar.appendChild(submit);
  }

  function thumbs(turn, duet) {
    const bar = el("div", "votes thumbs");
    const buttons = [["up", "Good answer"], ["down", "Bad answer"]].map(([rating, label]) => {
      const b = el("button", "", label);
      b.type = "button";
      b.addEventListener("click", () => vote(turn, {completion_id: duet.completion_id, vote_token: duet.vote_token, rating}, buttons));
      bar.appendChild(b);
      return b;
    });
    turn.appendChild(bar);
  }

  async function send(text) {
    if (pendingChoice) {  // no vote on the last comparison: continue with answer A
      messages.push({role: "assistant", content: pendingChoice.boxes[0].text});
      pendingChoice = null;
    }
    messages.push({role: "user", content: text});
    const userTurn = el("div", "turn user");
    userTurn.appendChild(el("div", "bubble", text));
    log.appendChild(userTurn);
    const turn = el("div", "turn assistant");
    log.appendChild(turn);
    let boxes = null, duet = null;
    try {
      const body = {model: await model(), messages, stream: true, duet: {pairs: pairsSelect.value, k: +kSelect.value}};
      const resp = await duetApi.call("/v1/chat/completions", {method: "POST", body: JSON.stringify(body)});
      for await (const chunk of sse(resp)) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (!boxes) boxes = answerBoxes(turn, Math.max(1, chunk.choices.length));
        for (const c of chunk.choices) {
          const b = boxes[c.index];
          if (b && c.delta && c.delta.content) {
            b.text += c.delta.content;
            b.bubble.textContent = b.text;
          }
        }
        if (chunk.duet) duet = chunk.duet;
        log.scrollTop = log.scrollHeight;
      }
    } catch (e) {
      messages.pop();
      showError(turn, e.message);
      return;
    }
    if (!boxes) return;
    const versions = duet ? (duet.model_versions || [duet.model_version]).join(" → ") : "?";
    turn.appendChild(el("div", "version", `model ${versions}`));
    if (duet && (duet.comparison_id || duet.completion_id)) boxes.forEach((_, i) => editAction(turn, boxes, i, duet));
    if (duet && duet.comparison_id) {
      pendingChoice = {turn, boxes};
      comparisonVotes(turn, boxes, duet);
    } else {
      messages.push({role: "assistant", content: boxes[0].text});
      if (duet && duet.completion_id) thumbs(turn, duet);
    }
    log.scrollTop = log.scrollHeight;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    sendBtn.disabled = true;
    try { await send(text); } finally { sendBtn.disabled = false; prompt.focus(); }
  });
})();
