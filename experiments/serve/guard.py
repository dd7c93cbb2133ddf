"""The server's outermost layer, as pure ASGI middleware (a BaseHTTPMiddleware would hide a client's
disconnect from the routes): the API key, each response's status in the metrics, and an exception
inside one request answered as that request's 500 in OpenAI's error shape."""

from __future__ import annotations

import secrets

from plutao.experiments.serve.metrics import Metrics
from plutao.experiments.serve.schemas import ApiError

OPEN = ("/health", "/", "/favicon.ico")  # routes answered without the API key (the page holds no model and no data)


class Guard:
    """Pure ASGI middleware (a BaseHTTPMiddleware would hide a client's disconnect from the routes): the
    API key on every route but OPEN, each response's status in the metrics, and an exception inside one
    request answered as that request's 500."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], {"code": 500, "started": False}
        if self.api_key and path not in OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                self.metrics.request(path, 401)
                return await ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                                      type="authentication_error", code="invalid_api_key").response()(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 (an error inside one request is that request's 500, never the server's)
            if not status["started"]:
                await ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()(
                    scope, receive, send)
        self.metrics.request(path, status["code"])
