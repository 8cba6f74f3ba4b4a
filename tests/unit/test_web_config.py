"""The metrics port's access files: exporter-toolkit's web config and a bearer token file."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import textwrap
from pathlib import Path

import bcrypt
import pytest

from gunicorn_prometheus import settings, web_config
from gunicorn_prometheus.settings import ConfigError

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(directory / "k.pem"), "-out", str(directory / "c.pem")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return directory


def test_users_tls_and_headers_with_paths_relative_to_the_file(cert_pair: Path) -> None:
    path = write(
        cert_pair / "web.yml",
        f"""
        tls_server_config:
          cert_file: c.pem
          key_file: k.pem
          min_version: TLS13
        http_server_config:
          headers:
            X-Frame-Options: deny
        basic_auth_users:
          alice: {HASH}
        """,
    )
    config = web_config.load(path)
    assert config.cert_file == cert_pair / "c.pem" and config.tls
    context = config.ssl_context()
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert config.headers == [("X-Frame-Options", "deny")]
    assert set(config.users) == {"alice"}


def test_an_empty_file_asks_for_nothing(tmp_path: Path) -> None:
    config = web_config.load(write(tmp_path / "web.yml", ""))
    assert not config.tls and not web_config.Access(config, None).required


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("basic_auth_users:\n  bob: secret\n", "basic_auth_users.bob is not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: c.pem\n", "needs both cert_file and key_file"),
        ("tls_server_config:\n  cert_file: c.pem\n  key_file: nope.pem\n", "cannot load cert_file"),
        ("tls_server_config:\n  cipher_suites: [x]\n", "tls_server_config.cipher_suites is not supported"),
        ("rate_limit:\n  burst: 1\n", "rate_limit is not supported"),
        ("basic_auth_users: [a]\n", "basic_auth_users must be a mapping"),
        ("a: [\n", "not valid YAML at line"),
        (
            "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n"
            "  client_auth_type: RequireAndVerifyClientCert\n",
            "needs client_ca_file",
        ),
    ],
)
def test_mistakes_are_one_line_naming_the_variable(cert_pair: Path, text: str, expected: str) -> None:
    path = write(cert_pair / "bad.yml", text)
    with pytest.raises(ConfigError) as err:
        settings.load({"METRICS_WEB_CONFIG": path})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"METRICS_WEB_CONFIG={path!r} is invalid"), message
    assert expected in message


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="METRICS_BEARER_TOKEN_FILE=.*cannot read the file"):
        settings.load({"METRICS_BEARER_TOKEN_FILE": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="METRICS_WEB_CONFIG=.*cannot read the file"):
        settings.load({"METRICS_WEB_CONFIG": str(tmp_path / "none")})


def test_basic_auth_checks_bcrypt_and_remembers_only_successes(tmp_path: Path) -> None:
    access = web_config.Access(
        web_config.load(write(tmp_path / "w.yml", f"basic_auth_users:\n  al: {HASH}\n")), None
    )
    assert access.required and access.challenge.startswith("Basic ")
    assert not access.known_good(basic("al", "pw"))  # not checked yet: bcrypt needed
    assert access.check(basic("al", "pw"))
    assert access.known_good(basic("al", "pw"))  # now without bcrypt
    for wrong in (basic("al", "nope"), basic("bob", "pw"), "Basic !!!", "Bearer pw", "", basic("al", "")):
        assert not access.check(wrong) and not access.known_good(wrong), wrong


def test_bearer_token_is_compared_whole_and_follows_the_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    access = web_config.Access(None, str(token))
    assert access.check("Bearer abc123") and access.known_good("Bearer abc123")
    for wrong in ("Bearer abc12", "Bearer abc1234", "bearer ABC123", "Basic abc123", ""):
        assert not access.check(wrong), wrong
    token.write_text("rotated\n")
    os.utime(token, (1, 1))  # a new modification time, whatever the clock's resolution
    assert access.check("Bearer rotated") and not access.check("Bearer abc123")
    token.unlink()  # a secret being replaced: the last good token stays valid meanwhile
    assert access.check("Bearer rotated")
