"""Serving the standalone app: the gradio Blocks mounted in our own FastAPI app, behind
`http_guard.RequestGuard`, on our own uvicorn server.

Why not `Blocks.launch()`: launch builds the FastAPI app and starts it in one call, with gradio's
`CORSMiddleware` (`Access-Control-Allow-Origin: *` on 3.41) outermost; middleware cannot be added
once the app has started, and nothing added before launch can wrap gradio's own. Mounting
(`gr.mount_gradio_app`, public API on 3.41 and later) lets the guard see every request first and
strip CORS headers from every answer. gradio's login (`--auth`) is kept: it is what the 3.41 queue
authenticates its own internal requests with.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:   # imported on use at run time
    import uvicorn

FIRST_PORT = 7860
PORTS_TRIED = 100
START_TIMEOUT_S = 60


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str, first: int = FIRST_PORT, count: int = PORTS_TRIED) -> int:
    """The first port from `first` nobody listens on at `host` (what gradio's launch does)."""
    for port in range(first, first + count):
        if port_is_free(host, port):
            return port
    raise OSError(f"no free port in {first}-{first + count - 1}; pass --port")


@dataclass
class RunningApp:
    """What `serve` returns: the Blocks, the server and its address; `close()` stops it."""
    blocks: Any                # a gradio Blocks (gradio is untyped)
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        try:
            self.blocks.close()          # gradio 3.41: stops the queue's tasks
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass


def build_asgi(blocks, port: int, *, listen: bool, auth: Optional[Sequence[tuple]] = None,
               css: Optional[str] = None):
    """Our FastAPI app with the Blocks at "/", wrapped in the request guard."""
    import fastapi
    import gradio as gr

    from . import compat
    from .http_guard import RequestGuard

    outer = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    options: dict[str, Any] = {"path": "/"}
    if compat.IS_GRADIO_3:
        # the 3.41 queue sends each job to <this URL>api/predict (through the guard: loopback Host)
        options["gradio_api_url"] = f"http://127.0.0.1:{port}/"
    if auth:
        if "auth" in compat.named_parameters(gr.mount_gradio_app):
            options["auth"] = list(auth)
        else:
            blocks.auth = list(auth)     # gradio 3.41 reads the logins from the Blocks when mounting
    if css and "css" in compat.named_parameters(gr.mount_gradio_app):
        options["css"] = css             # gradio 6+: page CSS is no longer a Blocks argument
    app = gr.mount_gradio_app(outer, blocks, **options)
    return RequestGuard(app, port=port, loopback_only=not listen)


def serve(blocks, host: str, port: Optional[int], *, listen: bool,
          auth: Optional[Sequence[tuple]] = None, css: Optional[str] = None) -> RunningApp:
    """Start the server in a thread and wait until it answers; returns a RunningApp."""
    import uvicorn

    if port and not port_is_free(host, port):
        raise OSError(f"port {port} is in use on {host}; pick another with --port (or leave it out)")
    port = port or free_port(host)
    config = uvicorn.Config(build_asgi(blocks, port, listen=listen, auth=auth, css=css), host=host, port=port,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lora-trainer-ui", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise OSError(f"the UI server did not start on {host}:{port} (port in use?)")
        time.sleep(0.05)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return RunningApp(blocks=blocks, server=server, thread=thread, url=f"http://{shown}:{port}/")


__all__ = ["RunningApp", "build_asgi", "free_port", "serve"]
