"""Helpers shared by every test directory: import them from here, never from a conftest or a test module.

One module a job: `paths` (where the repository is), `waiting` (bounded polls), `net` (free loopback
ports), `metrics_text` (reading a /metrics scrape), `server` (the start scripts as real processes),
`prometheus` (a real Prometheus server), `apps` (ASGI apps the tests serve), `containers` (the container
engine and containers of the image). Fixtures stay in the conftest.py files and call these.
"""
