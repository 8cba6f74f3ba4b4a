"""An upstream-style Gunicorn configuration of a user's own; prints which file was loaded."""

import os

print("gunicorn_conf loaded: app_package", flush=True)

bind = os.environ.get("BIND") or f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '80')}"
workers = 1
loglevel = "info"
accesslog = "-"
errorlog = "-"
graceful_timeout = 5
