"""The web layer of ``vitkit serve``: a FastAPI application around one :class:`~vitkit.serve.explorer.Explorer`.

Routes (JSON unless said otherwise; errors are ``{"error": message}`` with a 4xx/5xx status):

* ``GET /``: the page (``static/index.html``); ``GET /static/<file>``: its own files, nothing else.
* ``GET /api/info``: the model, task, classes, input size, attention layers and the methods that run on it.
* ``POST /api/images``: the raw image bytes as the body; returns the image's id, the model's input as a PNG and
  the task's prediction (top-k classes; boxes; a mask). 413 above the size or pixel limit, 400 for bytes that
  are not a readable image.
* ``GET /api/held-out/{index}``: the same for image ``index`` of the run's held-out split.
* ``GET /api/images/{id}/attention?layer=L&y=Y&x=X``, ``.../rollout``, ``.../cam[?target=C]``,
  ``.../gradcat[?target=C]``, ``.../distance``.

One computation runs at a time (the model is not shared between threads) and at most ``Limits.max_waiting``
more wait for it; any request beyond that is answered at once with 503 and ``Retry-After``, so a burst cannot
grow a queue or hold more than that many bodies in memory.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from vitkit.serve.explorer import Explorer, Limits, RequestError

STATIC = Path(__file__).resolve().parent / "static"


class Gate:
    """One computation at a time, at most ``max_waiting`` admitted behind it, the rest refused with 503.

    ``admitted`` is only changed on the event loop's thread, so it needs no lock; the computation itself runs in
    a worker thread holding ``lock``.
    """

    def __init__(self, max_waiting: int, retry_after_s: int):
        self.max_waiting, self.retry_after_s = max_waiting, retry_after_s
        self.lock = threading.Lock()
        self.admitted = 0

    def busy(self) -> bool:
        return self.admitted > self.max_waiting

    def refusal(self) -> RequestError:
        return RequestError(
            503,
            f"the server is busy ({self.admitted} requests in hand); try again in {self.retry_after_s} s",
            {"Retry-After": str(self.retry_after_s)},
        )

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.busy():
            raise self.refusal()
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, fn: Callable, *args):
        def locked():
            with self.lock:
                return fn(*args)

        return await run_in_threadpool(locked)


async def _read_body(request: Request, limit: int, keep: bool = True) -> bytes:
    """The request body (``keep=False``: read and dropped), 413 when it exceeds ``limit`` bytes.

    A body is read to its end before any answer, up to ``2 * limit`` bytes, so that a client still sending gets the
    answer (a 503, a 413) instead of a connection reset; a body declared larger than that is refused unread.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > 2 * limit:
        raise RequestError(413, f"the upload is {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 2 * limit:
            break
        if keep and size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise RequestError(413, f"the upload is over {limit} bytes; this server takes at most {limit}")
    return b"".join(chunks)


def create_app(explorer: Explorer) -> FastAPI:
    """The application serving ``explorer`` and the page."""
    limits = explorer.limits
    gate = Gate(limits.max_waiting, limits.retry_after_s)
    app = FastAPI(title=f"vitkit serve: {explorer.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gate = gate
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(ValueError)
    async def not_for_this_model(request: Request, e: ValueError):  # an interpret method that does not apply
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    async def info():
        return explorer.info()

    @app.post("/api/images")
    async def upload(request: Request):
        if gate.busy():  # refused, but the body is read first so the client hears why (see _read_body)
            await _read_body(request, limits.max_bytes, keep=False)
            raise gate.refusal()
        async with gate.slot():
            data = await _read_body(request, limits.max_bytes)
            return await gate.run(explorer.add_upload, data)

    @app.get("/api/held-out/{index}")
    async def held_out(index: int):
        async with gate.slot():
            return await gate.run(explorer.add_held_out, index)

    @app.get("/api/images/{image_id}/attention")
    async def attention(image_id: str, layer: int, y: int, x: int):
        async with gate.slot():
            return await gate.run(explorer.attention, image_id, layer, y, x)

    @app.get("/api/images/{image_id}/rollout")
    async def rollout(image_id: str):
        async with gate.slot():
            return await gate.run(explorer.rollout, image_id)

    @app.get("/api/images/{image_id}/cam")
    async def cam(image_id: str, target: int | None = None):
        async with gate.slot():
            return await gate.run(explorer.cam, image_id, target)

    @app.get("/api/images/{image_id}/gradcat")
    async def gradcat(image_id: str, target: int | None = None):
        async with gate.slot():
            return await gate.run(explorer.gradcat, image_id, target)

    @app.get("/api/images/{image_id}/distance")
    async def distance(image_id: str):
        async with gate.slot():
            return await gate.run(explorer.distance, image_id)

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # listening before the URL is announced: early connections wait in the backlog, not refused
    return sock


def _server(app: FastAPI, sock: socket.socket):
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765, announce: Callable = print) -> None:
    """Serve ``explorer`` on ``host:port`` (port 0: any free port) until interrupted; ``announce`` gets the URL."""
    sock = _bind(host, port)
    server = _server(create_app(explorer), sock)
    announce(url_of(sock))
    server.run(sockets=[sock])


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` (from :func:`create_app`) from a daemon thread (tests, scripts): returns ``(url, stop)``;
    ``stop()`` shuts it down."""
    sock = _bind(host, port)
    server = _server(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()

    return url_of(sock), stop


__all__ = ["Explorer", "Limits", "create_app", "serve", "start_in_thread"]
