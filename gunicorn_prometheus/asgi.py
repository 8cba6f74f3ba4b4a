"""Serve every app Uvicorn serves: ASGI2 apps are adapted to ASGI3 before our middleware wraps them.

Uvicorn tells the two interfaces apart when it loads an app, but our HTTP middleware wraps the app
before Uvicorn sees it, and is itself ASGI3: an ASGI2 app (a class taking the scope, whose instance is
awaited with receive and send, like upstream's sample app) would then be called with three arguments
and fail every request. So the worker adapts it first, with Uvicorn's own `ASGI2Middleware`.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from uvicorn.middleware.asgi2 import ASGI2Middleware


def is_asgi3(app: Any) -> bool:
    """Uvicorn's rule (uvicorn.config.Config.load, interface "auto"), which it exposes only inside load().

    A class is ASGI3 when its instances are awaitable, a function when it is a coroutine function, any
    other object when its ``__call__`` is one.
    """
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    if inspect.isfunction(app):
        return inspect.iscoroutinefunction(app)
    return inspect.iscoroutinefunction(type(app).__call__) if callable(app) else False


def as_asgi3(app: Any) -> Any:
    """The app itself when it is ASGI3, else the app behind Uvicorn's ASGI2 adapter."""
    return app if is_asgi3(app) else ASGI2Middleware(app)


class InFlight:
    """Outermost wrapper of a worker's app: how many requests a stop cut.

    Uvicorn cancels the requests still running when its graceful-shutdown timeout ends (set just below
    GRACEFUL_TIMEOUT by the worker hook, so the worker exits normally instead of being SIGKILLed by the
    master); a cancelled request ends here with CancelledError, which is counted in `cut` and not passed
    on: the worker is stopping, the request is lost either way, and Uvicorn would log a traceback for
    each (the worker logs one line with the count instead). Uvicorn cancels a request task only then.
    Nothing is counted on a request's normal path; it sits outside the HTTP instrumentation so it covers
    websockets too.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cut = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            self.cut += 1
