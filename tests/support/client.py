"""The tests' one-off HTTP requests, sharing one TLS context.

httpx's top-level functions (``httpx.get`` and the like) build a client for every call, and each client a
TLS context that loads the CA bundle: ~45 ms of CPU a call on the 2-core VM, http:// URLs included
(``httpx.get`` took 48 ms against 4 ms with a context given). The suite makes thousands of small requests
(polls, scrapes, Prometheus queries), so they share one context here. Each call still opens a connection
of its own, as before; a test that passes ``verify`` keeps it.
"""

from __future__ import annotations

from typing import Any

import httpx

TLS = httpx.create_ssl_context()


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("verify", TLS)
    return httpx.request(method, url, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return request("POST", url, **kwargs)
