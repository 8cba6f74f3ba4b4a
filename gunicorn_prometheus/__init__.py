"""Gunicorn + Uvicorn workers for ASGI apps, with one aggregated Prometheus view of every process."""

__version__ = "0.1.0"  # the one declaration of the version (pyproject.toml reads it from here)
