// The API key and OpenAI-shaped error handling shared by the chat page and the dashboard.
"use strict";
const duetApi = (() => {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromHash) {
    localStorage.setItem("duet-key", fromHash);
    history.replaceState(null, "", location.pathname);  // keep the key out of the address bar
  }
  const key = () => localStorage.getItem("duet-key") || "";
  const setKey = (k) => localStorage.setItem("duet-key", k.trim());

  // A message a person can act on, from an OpenAI error body and the HTTP status.
  function explain(status, body, headers) {
    const msg = body && body.error && body.error.message ? body.error.message : `HTTP ${status}`;
    if (status === 401) return "The API key was refused: paste a valid key in the top right (duet up prints one).";
    if (status === 429) {
      const wait = headers && headers.get("Retry-After");
      return `Slow down: rate limit reached${wait ? `; try again in ${wait} s` : ""}. (${msg})`;
    }
    if (status === 503) return `Not ready yet: ${msg}`;
    return msg;
  }

  async function call(path, options = {}) {
    const headers = Object.assign({"Content-Type": "application/json"}, options.headers || {});
    if (key()) headers.Authorization = `Bearer ${key()}`;
    let resp;
    try {
      resp = await fetch(path, Object.assign({}, options, {headers}));
    } catch (e) {
      throw new Error("The server does not answer: is duet up still running?");
    }
    if (!resp.ok) {
      let body = null;
      try { body = await resp.json(); } catch (e) { /* not JSON */ }
      const err = new Error(explain(resp.status, body, resp.headers));
      err.status = resp.status;
      throw err;
    }
    return resp;
  }
  return {key, setKey, call};
})();
