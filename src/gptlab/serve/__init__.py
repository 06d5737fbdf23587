"""`gptlab serve`: the HTTP API over the inference engine (schemas, errors, middleware, service, app)."""

from .app import create_app, is_loopback, running_server, serve

__all__ = ["create_app", "is_loopback", "running_server", "serve"]
