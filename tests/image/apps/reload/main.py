"""start-reload.sh test app, version 1."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def read_root():
    return {"version": 1}
