"""A custom app for MODULE_NAME/VARIABLE_NAME and APP_MODULE: the variable is `api`, not `app`."""

import os

from fastapi import FastAPI

api = FastAPI()


@api.get("/")
def read_root():
    # PRESTART_MARKER is exported by the prestart script that start.sh sources.
    return {"message": "custom app", "prestart": os.environ.get("PRESTART_MARKER")}
