// /docs: Swagger UI over /openapi.json. When the server has an API key, the schema (and every
// "Try it out") needs it: the key the web page keeps is sent as a Bearer token, and asked for
// once when the server answers 401.
"use strict";

const KEY_NAME = "imgrec-api-key";

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_NAME);
  } catch (e) {
    return null;
  }
}

async function fetchSchema() {
  for (let attempt = 0; attempt < 2; attempt++) {
    const key = storedKey();
    const r = await fetch("/openapi.json", key ? { headers: { Authorization: `Bearer ${key}` } } : {});
    if (r.status !== 401) return r.json();
    const entered = window.prompt("This server needs an API key:");
    if (!entered) break;
    sessionStorage.setItem(KEY_NAME, entered.trim());
  }
  throw new Error("the server needs an API key to show its documentation");
}

fetchSchema().then(
  (spec) => {
    SwaggerUIBundle({
      spec,
      dom_id: "#swagger-ui",
      layout: "BaseLayout",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
      requestInterceptor: (req) => {
        const key = storedKey();
        if (key && !req.headers.Authorization) req.headers.Authorization = `Bearer ${key}`;
        return req;
      },
    });
  },
  (e) => {
    document.getElementById("swagger-ui").textContent = `Cannot load the API schema: ${e.message}`;
  },
);
