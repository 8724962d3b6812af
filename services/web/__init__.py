"""The HTTP edge: a web page for visual search and a JSON API, in front of the gateway.

A thin translation layer and nothing more: every JSON endpoint is one gateway RPC over gRPC
(`services.gateway.client`), gRPC status codes become the usual HTTP codes with the gateway's
message in the body (`errors`), and listing photos come from the shared image store
(`common.image_store`). No ranking, no catalogue, no index access here.

    config.py     environment variables (documented there) -> WebConfig
    schemas.py    the JSON shapes of the API (they make the OpenAPI document at /openapi.json)
    errors.py     gRPC status -> HTTP status and body
    app.py        create_app(): routes, the static page, upload limits
    server.py     main(): uvicorn, optional filling of the photo store from prepared data
    static/       the page: index.html, app.js, style.css (no build step)
"""
