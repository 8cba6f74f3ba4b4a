"""ASGI apps the tests serve: one source of each, shared by the tests that need the same routes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, BackgroundTasks, FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

# Source of a FastAPI app with metrics of its own (a counter, a histogram, a livesum gauge) and routes that
# answer 200, 404, 418, 500, block the event loop or take a while: written into an app directory.
APP_WITH_OWN_METRICS = """
    import asyncio
    import time

    from fastapi import FastAPI, HTTPException
    from prometheus_client import Counter, Gauge, Histogram

    app = FastAPI()
    ORDERS = Counter("shop_orders", "Orders placed.", ["kind"])
    BASKET = Histogram("shop_basket_items", "Items per basket.", buckets=(1, 5, 10))
    OPEN_CARTS = Gauge("shop_open_carts", "Carts open now.", multiprocess_mode="livesum")


    @app.get("/")
    def read_root():
        return {"Hello": "World"}


    @app.get("/items/{item_id}")
    def read_item(item_id: int, q: str | None = None):
        return {"item_id": item_id, "q": q}


    @app.post("/orders/{kind}")
    def order(kind: str, items: int = 1):
        ORDERS.labels(kind).inc()
        BASKET.observe(items)
        OPEN_CARTS.inc()
        return {"ok": True}


    @app.get("/teapot")
    def teapot():
        raise HTTPException(status_code=418)


    @app.get("/boom")
    def boom():
        raise RuntimeError("boom")


    @app.get("/block")
    async def block(seconds: float = 5):
        time.sleep(seconds)  # blocks the event loop: the worker stops heart-beating
        return {"slept": seconds}


    @app.get("/slow")
    async def slow(seconds: float = 1):
        await asyncio.sleep(seconds)
        return {"slept": seconds}
"""


class Boom(Exception):
    """What the /boom route of make_app raises."""


def make_app() -> FastAPI:
    """Routes of every kind the path label must name by template: routers, nested routers, mounts."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    def read_item(item_id: int, q: str | None = None) -> dict[str, Any]:
        return {"item_id": item_id, "q": q}

    @app.get("/boom")
    async def boom() -> None:
        raise Boom("kaput")

    @app.get("/healthz")
    async def healthz() -> str:
        return "ok"

    @app.get("/static/{name}")
    async def static(name: str) -> str:
        return name

    @app.get("/later")
    async def later(tasks: BackgroundTasks) -> str:
        tasks.add_task(asyncio.sleep, 0.3)
        return "sent"

    router = APIRouter(prefix="/api")

    @router.get("/users/{user_id}")
    async def user(user_id: str) -> dict[str, str]:
        return {"user": user_id}

    inner = APIRouter(prefix="/inner")

    @inner.get("/x/{y}")
    async def inner_x(y: str) -> dict[str, str]:
        return {"y": y}

    router.include_router(inner)
    app.include_router(router, prefix="/v1")

    sub = FastAPI()

    @sub.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"thing": thing_id}

    app.mount("/sub", sub)

    async def plain(request: Any) -> PlainTextResponse:
        return PlainTextResponse("plain")

    app.mount(
        "/star",
        Starlette(routes=[Route("/r/{a}", plain), Mount("/m/{b}", routes=[Route("/leaf", plain)])]),
    )
    return app
