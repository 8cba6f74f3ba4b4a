"""start-reload.sh test app, version 2: copied over /app/main.py while the server runs."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def read_root():
    return {"version": 2}
