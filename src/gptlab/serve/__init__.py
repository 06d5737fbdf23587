"""`gptlab serve`: the HTTP API over the inference engine (schemas, errors, middleware, the engine thread,
the service, metrics, the app and how it runs), and the limits it serves under (limits.py).

Names load with their module on first use: the command line reads `ServerLimits` for `serve`'s options
without importing torch or the web stack.
"""

from __future__ import annotations

from ..lazy import lazy_attributes

_EXPORTS = {
    "ServerLimits": ".limits", "create_app": ".app", "is_loopback": ".runner", "running_server": ".runner",
    "serve": ".runner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
