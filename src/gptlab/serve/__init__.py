"""`gptlab serve`: the HTTP API over the inference engine (schemas, errors, middleware, the engine thread,
the service, metrics, the app and how it runs)."""

from .app import create_app
from .runner import is_loopback, running_server, serve

__all__ = ["create_app", "is_loopback", "running_server", "serve"]
