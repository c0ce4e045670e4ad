"""The review page's web app (Starlette, served by uvicorn on 127.0.0.1 only).

Every request must carry the session's random token (`?token=` for the page and the CSV link, the
`X-Review-Token` header for the page's API calls); anything else gets 403. Only `localhost` and
`127.0.0.1` are accepted as Host (a web page elsewhere cannot reach it through DNS rebinding).
The page is one file with inline CSS and JS (`page.html`, package data): it works offline, and its
Content-Security-Policy allows nothing outside this server.
"""

from __future__ import annotations

import secrets
import socket
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .store import ReviewStore

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'")


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


class _TokenGate(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        given = request.headers.get("x-review-token") or request.query_params.get("token") or ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            return PlainTextResponse("403: missing or wrong token. Open the full URL that `ollama-ft review` "
                                     "printed (it ends in ?token=...).", status_code=403)
        response = await call_next(request)
        # The token is in the URL: keep it out of caches and of Referer headers.
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def create_app(store: ReviewStore, token: str) -> Starlette:
    html = page_html()

    async def page(request: Request) -> Response:
        return HTMLResponse(html)

    async def state(request: Request) -> Response:
        return JSONResponse(store.page_state())

    async def rate(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be an object"}, status_code=400)
        try:
            # Synchronous on the event loop on purpose: saves happen one at a time, in arrival order.
            res = store.rate(body.get("item"), body.get("scores"), body.get("preference"))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except OSError as e:
            return JSONResponse({"error": f"could not save: {e}"}, status_code=500)
        return JSONResponse(res)

    async def export_csv(request: Request) -> Response:
        name = f"review-{store.comparison.run.root.name}-{store.comparison.key}-{store.reviewer}.csv"
        return Response(store.csv_blinded(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    routes = [Route("/", page), Route("/api/state", state), Route("/api/rate", rate, methods=["POST"]),
              Route("/export.csv", export_csv)]
    return Starlette(routes=routes, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"]),
        Middleware(_TokenGate, token=token),
    ])


def bind(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one the OS picks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        from ..core.errors import UserError

        raise UserError(f"cannot listen on 127.0.0.1:{port} ({e.strerror})",
                        hint="pick another --port, or leave --port out for a free one") from None
    sock.listen(64)
    return sock


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve until Ctrl-C (uvicorn handles the signal and shuts down cleanly)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.run(sockets=[sock])
