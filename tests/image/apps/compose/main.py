"""The compose test's app: the Quick Start routes and one that fails, to make the 5xx alert go pending."""

from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


@app.get("/")
def read_root():
    return {"Hello": "World"}


@app.get("/items/{item_id}")
def read_item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q}


@app.get("/fail")
def fail():
    return JSONResponse({"detail": "failing on purpose"}, status_code=503)
