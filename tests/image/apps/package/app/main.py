"""A package app at /app/app/main.py (found as `app.main`)."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def read_root():
    return {"message": "package app"}
