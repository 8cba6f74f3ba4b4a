"""Serve every app Uvicorn serves: the app object is loaded as Uvicorn would, where Uvicorn would.

Uvicorn makes its final app out of the object it is given when it loads it (``Config.load``, inside the
worker's running event loop): it calls the object with no arguments and serves what that returns if the
call succeeds (an app factory, which may need that loop: ``asyncio.get_running_loop()``, futures bound to
it), then tells ASGI2 from ASGI3 and adapts ASGI2 apps. Our wrappers go around the app before Uvicorn
sees it, and are themselves ASGI3 coroutine callables, so Uvicorn's load no longer sees the user's
object: a factory would be called with a scope (every request a 500), an ASGI2 app (a class taking the
scope, like upstream's sample app) with three arguments. So the worker's wrappers hold a
:class:`LoadOnFirstCall`, which takes Uvicorn's steps on the user's object at its first call (the
lifespan's, or the first request's: in the running loop) and then hands the app to the wrappers, which
call it directly from then on.

The wrappers pass reads of attributes they lack to the app: a user's ``post_worker_init`` (it runs after
ours) finds ``worker.wsgi.state`` as in plain Gunicorn.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

from uvicorn.middleware.asgi2 import ASGI2Middleware

# Uvicorn's choice (uvicorn/_compat.py): asyncio's also knows the markers older code sets; 3.14 deprecates it.
_iscoroutinefunction = (
    inspect.iscoroutinefunction if sys.version_info >= (3, 14) else asyncio.iscoroutinefunction
)


def is_asgi3(app: Any) -> bool:
    """Uvicorn's rule (``Config.load``, interface "auto"), which it applies only inside load().

    A class is ASGI3 when its instances are awaitable, a function when it is a coroutine function, any
    other object when its ``__call__`` attribute is one. The attribute is looked up on the object, not
    its type: Sentry's ``SentryAsgiMiddleware`` sets ``__call__`` per instance (a slot), and its type's
    ``__call__`` is then a slot descriptor, not a coroutine function.
    """
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    if inspect.isfunction(app):
        return _iscoroutinefunction(app)
    return _iscoroutinefunction(getattr(app, "__call__", None))  # noqa: B004 - Uvicorn's exact test


def load_like_uvicorn(app: Any, warn: Callable[[str], None]) -> Any:
    """The ASGI3 app Uvicorn would serve for ``app``: what a factory returns, ASGI2 apps adapted.

    Uvicorn calls whatever it is given with no arguments first, and serves the result when that call does
    not raise TypeError (an app's ``__call__`` needs three arguments, a factory none); ``warn`` is told,
    as Uvicorn warns, so a factory used without saying so shows in the log.
    """
    try:
        made = app()
    except TypeError:
        made = app
    else:
        warn(f"{_name(app)} was called as an app factory, and the app it returned is served")
    return as_asgi3(made)


class LoadOnFirstCall:
    """The user's app object, loaded as Uvicorn loads it (:func:`load_like_uvicorn`) at its first call.

    ``loaded`` is told the app then, so the wrappers that hold this object replace it by the app: only
    the first call goes through here. A load that raises (a factory failing) is tried again at the next
    call, and each such call fails as the load did, as Uvicorn's worker fails at each boot.
    """

    def __init__(self, app: Any, warn: Callable[[str], None], loaded: Callable[[Any], None]) -> None:
        self.object = app
        self._warn = warn
        self._loaded = loaded
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.app
        if app is None:
            app = self.app = load_like_uvicorn(self.object, self._warn)
            self._loaded(app)
        await app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        if name in ("app", "object"):  # not set yet: no recursion
            raise AttributeError(name)
        return pass_through(self.object if self.app is None else self.app, name)


def pass_through(app: Any, name: str) -> Any:
    """An attribute a wrapper lacks, read from the app it wraps (``worker.wsgi.state``); never a dunder
    (copy, pickle and protocol probes must see the wrapper as it is)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(app, name)


def as_asgi3(app: Any) -> Any:
    """The app itself when it is ASGI3, else the app behind Uvicorn's ASGI2 adapter."""
    return app if is_asgi3(app) else ASGI2Middleware(app)


def _name(app: Any) -> str:
    if isinstance(app, functools.partial):
        return f"partial({_name(app.func)})"
    return getattr(app, "__qualname__", None) or type(app).__qualname__


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

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # not set yet: no recursion
            raise AttributeError(name)
        return pass_through(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            self.cut += 1
