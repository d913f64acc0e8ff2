"""The app: the ASGI app of `serve`, its routes (the page, /api/predict, /api/model, /healthz,
/plots/NAME) and what guards every answer (the Host header check against DNS rebinding, the
security headers, one-line JSON errors).

The app never writes a file: it reads the static files shipped in the package, the run's model,
evaluations and the plots its manifest lists, and nothing else. A drawing is brought to MNIST
form and run on the event loop (cheaper than a hand-off to a thread); the cores are used by
worker processes (workers.py), each with its own event loop and its own ModelFollower.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from importlib import resources
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Match, Route

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.serve.batching import Batches
from mnistsum_cli.serve.card import listed_plots, run_card
from mnistsum_cli.serve.follower import ModelFollower
from mnistsum_cli.serve.parsing import RequestError, predict_input
from mnistsum_cli.store.diskfiles import MAX_PLOT_BYTES, read_file

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")  # --host values that listen on every address of the machine
HOST_HEADER = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]*)?")  # name[:port], [v6 address][:port]
SECURITY_HEADERS = {
    # every byte comes from this app: no CDN, no fonts, no analytics, no inline script or style
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC_FILES = {  # URL path -> (file in mnistsum_cli/serve/static, media type); nothing else is served from there
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def create_app(follower: ModelFollower, hosts: KnownHosts) -> SecurityHeaders:
    """The ASGI app of `serve`, answering with the follower's model the requests whose Host
    header `hosts` knows."""
    folder, device = follower.folder, follower.device
    static = {
        path: (resources.files("mnistsum_cli.serve").joinpath("static", name).read_bytes(), media)
        for path, (name, media) in STATIC_FILES.items()
    }

    batches = Batches(device)

    async def page(request: Request) -> Response:
        content, media_type = static[request.url.path]
        return Response(content, media_type=media_type)

    async def predict(request: Request) -> JSONResponse:
        image, number = await predict_input(request)
        served = await follower.get()
        problem = follower.problem  # as they were when the request came
        digit_probs, sum_probs = await batches.probabilities(served, image, number)
        return JSONResponse(
            {
                "digit": int(np.argmax(digit_probs)),
                "number": number,
                "sum": int(np.argmax(sum_probs)),
                "digit_probabilities": digit_probs,
                "sum_probabilities": sum_probs,
                "input": image.tolist(),
                "run_id": served.run_id,
                "problem": problem,
            }
        )

    async def model(request: Request) -> JSONResponse:
        served = await follower.get()
        return JSONResponse(run_card(folder, served, follower.problem))

    async def healthz(request: Request) -> JSONResponse:
        follower.refresh()  # a probe never waits for a load: it says what serves now
        served = follower.current
        return JSONResponse({"status": "ok", "run_id": served.run_id, "problem": follower.problem})

    async def plot(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in listed_plots(folder, await follower.get()):
            raise RequestError(404, "no such plot in this run's plots/manifest.json")
        try:
            content = read_file(folder.plots / name, MAX_PLOT_BYTES, "plot")
        except MnistsumError:
            raise RequestError(404, f"plot {name} is listed but cannot be read: rerun `mnistsum plot`") from None
        return Response(content, media_type="image/png")

    async def refused(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, RequestError):
            status, message = error.status, str(error)
        elif isinstance(error, HTTPException):
            status, message = (
                error.status_code,
                {404: "not found", 405: "method not allowed"}.get(error.status_code, str(error.detail)),
            )
        else:  # a bug: the client gets one line, the server keeps serving
            status, message = 500, f"internal error ({type(error).__name__})"
        # the rest of a body too large or too slow is not read: the connection cannot carry another request
        headers = {"Connection": "close"} if status in (408, 413) else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def gone(request: Request, error: Exception) -> Response:
        """A client that went away while its request was read: nobody reads the answer, and it
        is nothing to log (uvicorn logs each exception handled as a 500)."""
        return Response(status_code=400)

    routes = [Route(path, page) for path in STATIC_FILES] + [
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/model", model),
        Route("/healthz", healthz),
        Route("/plots/{name}", plot),
    ]

    async def slash_redirect(scope: dict, receive: Callable, send: Callable) -> None:
        """What Starlette's own slash redirect does (`/healthz/` -> `/healthz`), with a relative
        Location: Starlette writes an absolute one from the Host header, which a client chooses."""
        path = scope["path"]
        toggled = path.rstrip("/") if path.endswith("/") else path + "/"
        if path != "/" and any(route.matches({**scope, "path": toggled})[0] != Match.NONE for route in routes):
            query = scope["query_string"].decode("latin-1")
            await RedirectResponse(toggled + (f"?{query}" if query else ""))(scope, receive, send)
            return
        raise HTTPException(404)

    app = Starlette(
        routes=routes,
        exception_handlers={
            Exception: refused,
            HTTPException: refused,
            RequestError: refused,
            ClientDisconnect: gone,
        },
    )
    app.router.redirect_slashes, app.router.default = False, slash_redirect
    return SecurityHeaders(hosts.guarding(app))


class KnownHosts:
    """The Host header names `serve` answers: the loopback names, and the --host it listens on
    (with any port: an ssh tunnel or a port forward changes it). Others get a 400, so that a
    page of another site cannot reach the server through a name of its own that it points at
    127.0.0.1 (DNS rebinding). Listening on every address (0.0.0.0, ::), any IP address is
    answered too, and the machine's own names: a browser sends an IP address as the Host only
    when it went to that address itself, never for another site's page."""

    def __init__(self, host: str) -> None:
        self.any_address = host in ANY_ADDRESS
        names = {*LOOPBACK, host, *((socket.gethostname(), socket.getfqdn()) if self.any_address else ())}
        self.names = frozenset(f"[{name.lower()}]" if ":" in name else name.lower() for name in names if name)

    def knows(self, header: str) -> bool:
        """Whether a Host header (`name`, `name:port`, `[v6]:port`) names this server."""
        match = HOST_HEADER.fullmatch(header)
        if match is None:
            return False
        name = match.group(1).lower()
        return name in self.names or (self.any_address and _is_address(name.strip("[]")))

    def guarding(self, app: Callable) -> Callable:
        """`app` behind the check: a request with an unknown Host gets a 400 and one line."""

        async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "http" and not self.knows(
                next((value for name, value in scope["headers"] if name == b"host"), b"").decode("latin-1")
            ):
                refusal = {"error": "unknown Host header: open the address `mnistsum serve` printed"}
                await JSONResponse(refusal, status_code=400)(scope, receive, send)
                return
            await app(scope, receive, send)

        return guarded


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class SecurityHeaders:
    """ASGI wrapper adding SECURITY_HEADERS to every response, error responses included."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_secured)
