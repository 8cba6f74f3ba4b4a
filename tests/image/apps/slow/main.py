"""An app with a slow endpoint, to stop the container while a request is in flight."""

import asyncio

from fastapi import FastAPI

app = FastAPI()
in_flight = 0


@app.get("/")
def read_root():
    return {"Hello": "World"}


@app.get("/slow")
async def slow(seconds: float = 3.0):
    global in_flight
    in_flight += 1
    try:
        await asyncio.sleep(seconds)
    finally:
        in_flight -= 1
    return {"slept": seconds}


@app.get("/inflight")
async def inflight():
    return {"in_flight": in_flight}
