"""deploy/rules.yml: valid for promtool, each alert unit-tested both ways, documented, and shipped alike.

`promtool test rules tests/unit/rules_test.yml` evaluates the rules over synthetic series (offline, no
server); tests/integration/test_dashboard.py and the compose test run them in a real Prometheus.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gunicorn_prometheus import names
from tests.support.promql import selectors

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "rules.yml"
RULES_TEST = Path(__file__).with_name("rules_test.yml")
RUNBOOKS = REPO / "docs" / "alerts.md"
RUNBOOK_BASE = "https://github.com/gunicorn-prometheus/gunicorn-prometheus/blob/main/docs/alerts.md#"
# Series Prometheus writes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds"}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "the Debian package `prometheus` (promtool) is missing: run scripts/install --test"
    return found


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def test_promtool_checks_the_rules():
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    assert len(alerts()) >= 6


def test_promtool_unit_tests_pass():
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULES_TEST)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULES_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == ["../../deploy/rules.yml"]
    fires, silent = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names_ = {alert["alert"] for alert in alerts()}
    assert names_ - fires == set(), "alerts with no case where they fire"
    assert names_ - silent == set(), "alerts with no case where they stay silent"
    assert fires | silent <= names_, "tests of alerts that do not exist"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_has_severity_summary_description_and_runbook(alert):
    assert re.fullmatch(r"Gunicorn[A-Z][A-Za-z0-9]+", alert["alert"])
    assert alert["labels"]["severity"] in ("critical", "warning")
    annotations = alert["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert "{{ $labels.instance }}" in annotations["summary"]
    assert len(annotations["description"]) > len(annotations["summary"]) > 10
    assert annotations["runbook_url"] == RUNBOOK_BASE + alert["alert"].lower()
    sections = re.findall(r"^## (\w+)\n\n(.*?)(?=^## |\Z)", RUNBOOKS.read_text(), re.M | re.S)
    body = dict(sections)[alert["alert"]]
    assert "- Look at:" in body and "- Do:" in body


def test_every_runbook_section_is_an_alert():
    sections = re.findall(r"^## (\w+)$", RUNBOOKS.read_text(), re.M)
    assert sorted(sections) == sorted(alert["alert"] for alert in alerts())


def known_series() -> set[str]:
    """The names of names.py as Prometheus stores them, Prometheus' own series and our recorded ones."""
    found = set(PROMETHEUS_SERIES) | {rule["record"] for rule in rules() if "record" in rule}
    for name in vars(names).values():
        if isinstance(name, str) and re.fullmatch(r"[a-z_]+", name):
            found |= {name, name + "_total", name + "_bucket", name + "_count", name + "_sum"}
    return found


def test_every_series_in_the_rules_is_named_in_names_py_or_recorded_here():
    known = known_series()
    for rule in rules():
        found = selectors(rule["expr"])
        assert found, rule["expr"]
        for selector in found:
            assert selector["name"] in known, f"{selector['name']} in {rule['expr']!r}"
            if selector["name"].endswith(("_total", "_bucket")):
                assert selector["function"] in ("rate", "increase"), rule["expr"]


def test_recording_rules_follow_the_naming_convention_and_keep_target_labels():
    for rule in rules():
        if "record" in rule:
            level, metric, operations = rule["record"].split(":")
            assert level.startswith("instance") and metric and operations, rule["record"]
            # aggregations drop named labels only (`without`), so job, instance and whatever labels the
            # service discovery adds (namespace, pod) survive for the dashboard to filter on
            assert " by (" not in rule["expr"], rule["record"]


def test_the_prometheus_rule_for_kubernetes_holds_the_same_groups():
    document = yaml.safe_load((REPO / "k8s" / "prometheusrule.yaml").read_text())
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert document["spec"] == yaml.safe_load(RULES.read_text()), "rerun scripts/prometheusrule"


def test_the_compose_prometheus_loads_the_rules():
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in services["prometheus"]["volumes"])
    assert config["rule_files"] == [mounts["./deploy/rules.yml"]]
