"""Access control of the metrics port: Prometheus' "web config" file and a bearer token file.

Prometheus exporters read one YAML file (prometheus/exporter-toolkit's web configuration) for TLS and
basic auth, and Prometheus' `scrape_config` has the matching client side (`tls_config`, `basic_auth`,
`authorization`); accepting the same file means operators reuse what they have. Supported:

    tls_server_config:        cert_file, key_file (required together), client_ca_file,
                              client_auth_type (NoClientCert, VerifyClientCertIfGiven,
                              RequireAndVerifyClientCert), min_version, max_version (TLS10..TLS13)
    http_server_config:       headers (added to every response)
    basic_auth_users:         user: bcrypt hash

Other keys of the format (inline `cert`/`key`, cipher and curve choices, `rate_limit`, …) are refused
by name rather than ignored, so a file never means less than it says. Relative paths are relative to
the file's directory, as in exporter-toolkit. The file is read once per process start (exporter-toolkit
re-reads it per request); the token file is re-read when its modification time changes, so a rotated
Kubernetes secret takes effect without a restart.

Both are validated when the settings are loaded, so a mistake is one line at start-up naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
_HTTP_KEYS = {"headers"}
# Successful basic-auth checks remembered (bcrypt costs tens of ms per check; Prometheus sends the same
# credentials every scrape). exporter-toolkit caches the same way.
_CACHE_SIZE = 64
REALM = 'Basic realm="metrics"'


class WebConfigError(ValueError):
    """What is wrong with the file, as the tail of a one-line message naming the variable."""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise WebConfigError(f"{where} must be a mapping")
    return value


def _unknown(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(mapping) - allowed)
    if extra:
        raise WebConfigError(
            f"{where}{extra[0]} is not supported here (supported: {', '.join(sorted(allowed))})"
        )


@dataclass
class WebConfig:
    """The parsed file: what the metrics server needs to build its TLS context and check credentials."""

    path: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    client_auth: ssl.VerifyMode = ssl.CERT_NONE
    min_version: ssl.TLSVersion | None = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    users: dict[str, bytes] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None without `tls_server_config`. Raises WebConfigError."""
        if not self.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.min_version is not None:
            context.minimum_version = self.min_version
        if self.max_version is not None:
            context.maximum_version = self.max_version
        try:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as err:
            raise WebConfigError(
                f"tls_server_config: cannot load cert_file {self.cert_file} with key_file "
                f"{self.key_file}: {getattr(err, 'strerror', None) or err}"
            ) from None
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(str(self.client_ca_file))
            except (OSError, ssl.SSLError) as err:
                raise WebConfigError(
                    f"tls_server_config: cannot load client_ca_file {self.client_ca_file}: "
                    f"{getattr(err, 'strerror', None) or err}"
                ) from None
        context.verify_mode = self.client_auth
        return context


def load(path: str) -> WebConfig:
    """Read and check the file (YAML, exporter-toolkit's schema); raises WebConfigError."""
    import yaml  # only needed when the file is used

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as err:
        raise WebConfigError(f"cannot read the file: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WebConfigError(f"not valid YAML{where}") from None
    top = _mapping(data, "the file")
    _unknown(top, _TOP_KEYS, "")
    base = file.parent
    config = WebConfig(path=file)

    tls = _mapping(top.get("tls_server_config"), "tls_server_config")
    _unknown(tls, _TLS_KEYS, "tls_server_config.")
    if tls:

        def a_path(key: str) -> Path | None:
            value = tls.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                raise WebConfigError(f"tls_server_config.{key} must be a file name")
            return base / value

        config.cert_file, config.key_file = a_path("cert_file"), a_path("key_file")
        if config.cert_file is None or config.key_file is None:
            raise WebConfigError("tls_server_config needs both cert_file and key_file")
        config.client_ca_file = a_path("client_ca_file")
        auth = tls.get("client_auth_type", "NoClientCert")
        if auth not in _CLIENT_AUTH:
            raise WebConfigError(
                f"tls_server_config.client_auth_type {auth!r} is not one of {', '.join(_CLIENT_AUTH)}"
            )
        config.client_auth = _CLIENT_AUTH[auth]
        if config.client_auth != ssl.CERT_NONE and config.client_ca_file is None:
            raise WebConfigError(f"tls_server_config.client_auth_type {auth} needs client_ca_file")
        for key in ("min_version", "max_version"):
            if key in tls:
                if tls[key] not in _TLS_VERSIONS:
                    raise WebConfigError(
                        f"tls_server_config.{key} {tls[key]!r} is not one of {', '.join(_TLS_VERSIONS)}"
                    )
                setattr(config, key, _TLS_VERSIONS[tls[key]])

    http = _mapping(top.get("http_server_config"), "http_server_config")
    _unknown(http, _HTTP_KEYS, "http_server_config.")
    headers = _mapping(http.get("headers"), "http_server_config.headers")
    for name, value in headers.items():
        if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise WebConfigError(f"http_server_config.headers.{name} must be a header name with a text value")
        config.headers.append((name, value))

    users = _mapping(top.get("basic_auth_users"), "basic_auth_users")
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(f"basic_auth_users.{user} is not a bcrypt hash (such as $2y$10$...)")
        if ":" in user:
            raise WebConfigError(f"basic_auth_users: user name {user!r} contains ':'")
        config.users[user] = hashed.encode()

    config.ssl_context()  # loads the certificate and key now, so a bad pair fails the start
    return config


def read_token(path: str) -> bytes:
    """The bearer token in a file (surrounding whitespace removed); raises WebConfigError."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as err:
        raise WebConfigError(f"cannot read the file: {err.strerror}") from None
    if not token:
        raise WebConfigError("the file is empty")
    if any(c < 0x21 or c > 0x7E for c in token):
        raise WebConfigError("the token must be printable ASCII without spaces")
    return token


# --- the setting parsers (settings.py): validate now, keep the path --------------------------------


def parse_web_config_setting(raw: str) -> str:
    try:
        load(raw)
    except WebConfigError as err:
        raise ValueError(f"a Prometheus web config file (exporter-toolkit format): {err}") from None
    return raw


def parse_token_file_setting(raw: str) -> str:
    try:
        read_token(raw)
    except WebConfigError as err:
        raise ValueError(f"a file holding the bearer token: {err}") from None
    return raw


# --- checking a request's credentials ----------------------------------------------------------------


class Access:
    """Whether a request's `Authorization` header is acceptable. Thread-safe; `check` may block (bcrypt).

    With neither basic-auth users nor a token everything is allowed. With both, either one will do.
    """

    def __init__(self, config: WebConfig | None, token_file: str | None) -> None:
        self.users = dict(config.users) if config is not None else {}
        self.token_file = token_file
        self._token: bytes | None = None
        self._token_mtime: float | None = None
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        if token_file:
            self._token_now()

    @property
    def required(self) -> bool:
        return bool(self.users or self.token_file)

    @property
    def challenge(self) -> str:
        return REALM if self.users else 'Bearer realm="metrics"'

    def check(self, authorization: str) -> bool:
        if not self.required:
            return True
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token_file:
            token = self._token_now()
            return token is not None and hmac.compare_digest(credentials.strip().encode(), token)
        if scheme == "basic" and self.users:
            return self._check_basic(credentials.strip())
        return False

    def _token_now(self) -> bytes | None:
        assert self.token_file is not None
        try:
            mtime = os.stat(self.token_file).st_mtime
            if mtime != self._token_mtime:
                self._token, self._token_mtime = read_token(self.token_file), mtime
        except (OSError, WebConfigError):
            pass  # keep the last good token (a secret is replaced by a rename: briefly missing)
        return self._token

    def known_good(self, authorization: str) -> bool:
        """Whether the header is a bearer token or remembered basic credentials that pass: no bcrypt, so
        the event loop may call it, and a legitimate scraper never waits behind bcrypt of bad guesses."""
        if not self.required:
            return True
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.check(authorization)
        parsed = self._basic(credentials.strip()) if scheme.lower() == "basic" and self.users else None
        if parsed is None:
            return False
        with self._lock:
            return parsed[2] in self._good

    def _equal_time(self) -> None:
        """A rejected unknown user costs one bcrypt check too, so timing does not tell which users exist."""
        import bcrypt

        if self.users:
            bcrypt.checkpw(b"-", next(iter(self.users.values())))

    def _basic(self, encoded: str) -> tuple[str, str, bytes] | None:
        """(user, password, cache key) of a Basic header naming a configured user, else None."""
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        hashed = self.users.get(user)
        if not sep or hashed is None:
            return None
        return user, password, hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed))).digest()

    def _check_basic(self, encoded: str) -> bool:
        parsed = self._basic(encoded)
        if parsed is None:
            self._equal_time()
            return False
        user, password, key = parsed
        with self._lock:
            if key in self._good:
                self._good.move_to_end(key)
                return True
        import bcrypt

        if not bcrypt.checkpw(password.encode(), self.users[user]):
            return False
        with self._lock:
            self._good[key] = None
            while len(self._good) > _CACHE_SIZE:
                self._good.popitem(last=False)
        return True
