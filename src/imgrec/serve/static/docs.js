// /docs: Swagger UI over /openapi.json. When the server has an API key, the schema (and every
// "Try it out") needs it: the key the web page keeps is sent as a Bearer token, and asked for
// once when the server answers 401.
"use strict";

async function fetchSchema() {
  const r = await api("/openapi.json"); // key.js: asks for the key once on 401
  if (r.status === 401) throw new Error("the server needs an API key to show its documentation");
  return r.json();
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
