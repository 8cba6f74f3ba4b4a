"""Every setting parses its documented default, and every bad value is one line naming it."""

import dataclasses

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
        ("METRICS_SKIP_PATHS", "/a,/b(", "'/b(' is not a valid regular expression"),
        ("PROMETHEUS_MULTIPROC_DIR", "/proc/metrics", "not under /proc"),
        ("PROMETHEUS_MULTIPROC_DIR", "metrics", "an absolute directory path"),
        ("GUNICORN_CONTROL_SOCKET", "gunicorn.ctl", "an absolute path"),
        ("GUNICORN_CMD_ARGS", "--no-such-option", "unrecognized arguments: --no-such-option"),
        ("GUNICORN_CMD_ARGS", "--log-level 'debug", "Gunicorn command-line options"),
        ("ACCESS_LOG", "/nonexistent/access.log", "a file in an existing directory"),
        ("CGROUP_ROOT", "sys/fs/cgroup", "an absolute path"),
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


def test_settings_object_is_typed_frozen_and_complete():
    values = settings.Settings.from_environ({"PORT": "8080", "METRICS_SKIP_PATHS": "/health"})
    assert values.port == 8080 and values.metrics_skip_paths == frozenset({"/health"})
    assert values.effective_bind == "0.0.0.0:8080"
    with pytest.raises(AttributeError):
        values.port = 1  # type: ignore[misc]
    # every declared setting is parsed, and readable by name whether or not it has a typed field yet
    assert set(values.values) == set(settings.BY_NAME)
    for field in dataclasses.fields(settings.Settings):
        if field.name.upper() in settings.BY_NAME:
            assert getattr(values, field.name) == values.value(field.name.upper())


def test_current_is_built_once_per_environment(monkeypatch):
    monkeypatch.setenv("PORT", "8081")
    first = settings.current()
    assert settings.current() is first and first.port == 8081
    monkeypatch.setenv("PORT", "8082")
    assert settings.current().port == 8082


def test_table_has_one_heading_per_section():
    table = settings.markdown_table()
    for section in {s.section for s in settings.SETTINGS}:
        assert f"| **{settings.SECTION_TITLES[section]}** | | |" in table


def test_default_buckets_are_prometheus_clients():
    from prometheus_client import Histogram

    default = settings.BY_NAME["METRICS_BUCKETS"].default
    assert default == ",".join(str(b) for b in Histogram.DEFAULT_BUCKETS if b != float("inf"))
