"""Running the app: `serve` for the command line, `running_server` for tests, benchmarks and notebooks.

Both bind the socket themselves before uvicorn starts, so a port that is taken (or not allowed) is
one clear error, and the port cannot be taken in between.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from .limits import ServerLimits
from ..errors import EnvironmentProblem, GptlabError
from ..inference.loading import load_pretrained
from .app import create_app

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0 picks a free port); an address that cannot be had is one error."""
    if not 0 <= port <= 65535:
        raise GptlabError(f"port {port} is out of range: choose one in 1-65535 (0 picks a free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise GptlabError(f"cannot bind to {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: {exc.strerror} "
                                 f"(another server there? choose another --port)") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if sock.family == socket.AF_INET6 else host}:{port}"


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread of this process and yield its base URL; port 0 picks a free port."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gptlab-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield base_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str | torch.device = "cpu",
          model_id: str | None = None, limits: ServerLimits = ServerLimits(), dtype: str = "float32",
          quantize: str | None = None) -> None:
    """Load the model once (in `dtype`, int8-quantized with `quantize="int8"`) and serve it until interrupted."""
    model, tokenizer = load_pretrained(model_dir, device, dtype=dtype, quantize=quantize)
    sock = bind(host, port)
    name = model_id or Path(str(model_dir).rstrip("/")).name
    url = base_url(sock)

    def welcome() -> None:
        print(f"gptlab serve: {name} at {url} (Ctrl+C stops it)\n"
              f"  playground:  {url}/\n"
              f"  API docs:    {url}/docs\n"
              f"  try:         curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"Once upon a time\", \"max_tokens\": 20}}'\n"
              f"  metrics:     curl {url}/metrics", file=sys.stderr, flush=True)

    allowed = list(LOOPBACK_NAMES) if is_loopback(host) else None
    print(f"gptlab serve: warming up {name} at batch size 1 (the first start on a machine also measures its "
          f"kernels; batch sizes up to {limits.max_batch} follow once it listens)", file=sys.stderr, flush=True)
    app = create_app(model, tokenizer, name, limits, allowed_hosts=allowed, on_start=welcome)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
