"""Every setting parses its documented default, and every bad value is one line naming it."""

import pytest

from gunicorn_prometheus import settings
from gunicorn_prometheus.settings import ConfigError


def test_defaults_match_upstream():
    values = settings.load({})
    assert values["VARIABLE_NAME"] == "app"
    assert values["WORKERS_PER_CORE"] == 1.0
    assert values["MAX_WORKERS"] is None and values["WEB_CONCURRENCY"] is None
    assert (values["HOST"], values["PORT"], values["BIND"]) == ("0.0.0.0", 80, None)
    assert values["LOG_LEVEL"] == "info"
    assert values["WORKER_CLASS"] == "uvicorn_worker.UvicornWorker"
    assert (values["TIMEOUT"], values["KEEP_ALIVE"]) == (120, 5)
    assert values["GRACEFUL_TIMEOUT"] < 10  # fits Docker's default stop grace
    assert (values["ACCESS_LOG"], values["ERROR_LOG"]) == ("-", "-")
    assert values["METRICS_PORT"] == 9464 and values["METRICS_INSTRUMENT"] is True
    assert values["METRICS_SKIP_PATHS"] == frozenset()


def test_empty_log_values_turn_logs_off():
    values = settings.load({"ACCESS_LOG": "", "ERROR_LOG": ""})
    assert values["ACCESS_LOG"] is None and values["ERROR_LOG"] is None


def test_empty_value_means_default_elsewhere():
    assert settings.load({"PORT": "", "WEB_CONCURRENCY": ""})["PORT"] == 80


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("WORKERS_PER_CORE", "abc", "a number > 0"),
        ("WORKERS_PER_CORE", "0", "a number > 0"),
        ("PORT", "70000", "an integer from 1 to 65535"),
        ("PORT", "eighty", "an integer from 1 to 65535"),
        ("WEB_CONCURRENCY", "0", "an integer >= 1"),
        ("MAX_WORKERS", "-1", "an integer >= 0"),
        ("TIMEOUT", "1.5", "an integer >= 0"),
        ("LOG_LEVEL", "verbose", "one of debug, info"),
        ("BIND", "nowhere", "host:port"),
        ("BIND", "0.0.0.0:99999", "host:port"),
        ("MODULE_NAME", "app/main.py", "dotted Python module"),
        ("VARIABLE_NAME", "my-app", "Python variable name"),
        ("APP_MODULE", "main:", "module:variable"),
        ("PRE_START_PATH", '"/app/prestart.sh"', "without surrounding quotes"),
        ("PRE_START_PATH", "'/app/prestart.sh'", "without surrounding quotes"),
        ("METRICS_INSTRUMENT", "maybe", "true or false"),
        ("METRICS_BUCKETS", "1,0.5", "increasing numbers"),
        ("METRICS_SKIP_PATHS", "health", "starting with /"),
        ("METRICS_FLUSH_INTERVAL", "-1", "a number >= 0"),
    ],
)
def test_bad_value_is_one_line_naming_variable_value_and_expectation(name, value, expected):
    with pytest.raises(ConfigError) as info:
        settings.load({name: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r} is invalid: expected ")
    assert expected in message


def test_every_bad_variable_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        settings.load({"PORT": "x", "TIMEOUT": "y"})
    lines = str(info.value).splitlines()
    assert [line.split("=")[0] for line in lines] == ["PORT", "TIMEOUT"]


def test_each_setting_declared_once_with_doc_and_parsable_default():
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    for s in settings.SETTINGS:
        assert s.doc.strip(), s.name
        if s.default is not None:
            settings.parse_one(s, {})  # raises if a declared default does not parse


def test_buckets_and_skip_paths_parse():
    values = settings.load({"METRICS_BUCKETS": "0.1, 1,10", "METRICS_SKIP_PATHS": "/health, /ready"})
    assert values["METRICS_BUCKETS"] == (0.1, 1.0, 10.0)
    assert values["METRICS_SKIP_PATHS"] == frozenset({"/health", "/ready"})
