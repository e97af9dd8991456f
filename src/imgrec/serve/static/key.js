// The API key, shared by the page (app.js) and /docs (docs.js). A server started with
// --api-key answers 401 without one: the page asks once, keeps the key for this tab
// (sessionStorage) and sends it as a Bearer token.
"use strict";

const KEY_NAME = "imgrec-api-key";

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_NAME);
  } catch (e) {
    return null;
  }
}

function askKey(refused) {
  const entered = window.prompt(
    refused ? "That API key was refused. API key:" : "This server needs an API key:",
  );
  if (!entered || !entered.trim()) return null;
  sessionStorage.setItem(KEY_NAME, entered.trim());
  return entered.trim();
}

// fetch() with the key; on 401, ask for a key (once: a request that finds a newer key than the
// one it sent just retries with it) and send the request again.
async function api(url, options = {}) {
  let refused = false;
  for (let attempt = 0; attempt < 3; attempt++) {
    const key = storedKey();
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const r = await fetch(url, { ...options, headers });
    if (r.status !== 401) return r;
    if (storedKey() !== key) continue; // another request was given a key meanwhile
    if (key) {
      sessionStorage.removeItem(KEY_NAME);
      refused = true;
    }
    if (attempt === 2 || !askKey(refused)) return r;
  }
  return fetch(url, options);
}
