"""Pure ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware on the hot vote path):
refuses bodies over the limit — by Content-Length up front, and for chunked bodies (no Content-Length) as
soon as the bytes received pass it, without reading the rest — and records requests and their duration."""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException

from serving import metrics
from serving.errors import error_response


class LimitsAndMetrics:
    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                response = error_response(413, f"Request body is {int(length)} bytes; the limit is "
                                               f"{self.max_body_bytes}.", code="request_too_large")
                await response(scope, receive, send_and_watch)
            else:
                await self.app(scope, self._limited(receive), send_and_watch)
        finally:
            # The router fills scope["route"]: label by route template, never by raw path (cardinality).
            route = scope.get("route")
            path = route.path if route is not None else "unmatched"
            metrics.REQUESTS.labels(route=path, status=str(status)).inc()
            metrics.LATENCY.labels(route=path).observe(time.perf_counter() - t0)

    def _limited(self, receive):
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # answered 413 by the app's HTTPException handler
                    raise HTTPException(413, f"Request body is larger than {self.max_body_bytes} bytes.")
            return message

        return receive_limited
