"""Upstream's Quick Start app with one metric of its own.

`ITEMS_READ` is an ordinary prometheus_client Counter. The image runs several worker processes and sets
PROMETHEUS_MULTIPROC_DIR before any of them starts, so every worker's increments land in one total on
the metrics port (http://HOST:9464/metrics), not on the app's port.
"""

from fastapi import FastAPI
from prometheus_client import Counter

app = FastAPI()

ITEMS_READ = Counter("items_read", "Items read through /items/{item_id}.")


@app.get("/")
def read_root():
    return {"Hello": "World"}


@app.get("/items/{item_id}")
def read_item(item_id: int, q: str | None = None):
    ITEMS_READ.inc()
    return {"item_id": item_id, "q": q}
