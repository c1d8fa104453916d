"use strict";
// FastAPI's OpenAPI page, without its inline script (the page's CSP forbids inline script) and with swagger-ui
// served from this origin; validatorUrl null: swagger-ui would otherwise fetch a badge from its validator.
document.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({  // eslint-disable-line no-undef
    url: "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null, deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset].filter(Boolean),
    layout: "BaseLayout",
  });
});
