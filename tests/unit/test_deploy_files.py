"""The deployment files hold together: the Grafana dashboard, docker-compose.yml, deploy/ and k8s/.

Static checks only (no network, no Docker, no cluster): the dashboard imports in one step and follows the
rules of a correct Prometheus dashboard, every metric it names is one the README documents, and the
compose file and Kubernetes manifests agree with the image (ports, /healthz, stop grace).
The dashboard's queries are run against a real Prometheus in tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gunicorn_prometheus import names, settings
from tests.support.paths import REPO, VENV_BIN
from tests.support.promql import selectors

DASHBOARD_PATH = REPO / "grafana" / "dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRICS_PORT = int(settings.BY_NAME["METRICS_PORT"].default)
DEFAULT_GRACEFUL_TIMEOUT = int(settings.BY_NAME["GRACEFUL_TIMEOUT"].default)
GRACE_MARGIN = 2  # README: keep GRACEFUL_TIMEOUT at least 2 s below the orchestrator's stop grace

# Series Prometheus itself writes for every target: allowed in the dashboard although the README's tables
# do not list them.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
RULES_PATH = REPO / "deploy" / "rules.yml"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
RANGE_FUNCTIONS = {"rate", "increase"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, those nested in collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def panel_targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(panel["title"], t) for panel in all_panels(dashboard) for t in panel.get("targets", [])]


def expressions(dashboard: dict) -> list[str]:
    return [target["expr"] for _, target in panel_targets(dashboard)]


def readme_metrics() -> dict[str, str]:
    """Metric name -> type, from every table row of the README's Metrics section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_:][a-z0-9_:]*)` \| (counter|gauge|histogram|summary) \|", section, re.M)
    assert len(rows) >= 15, rows
    return dict(rows)


def known_series() -> set[str]:
    """The README's metrics, the planned ones of names.py, Prometheus' own series and our recorded ones.

    Planned names are allowed so that a panel can be in place before its metric lands (the saturation and
    metrics-server panels); the integration test runs their queries all the same.
    """
    known = set(PROMETHEUS_SERIES) | recorded_series()
    for name, kind in readme_metrics().items():
        known.add(name)
        if kind in ("histogram", "summary"):
            known.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    for name in vars(names).values():
        if isinstance(name, str) and re.fullmatch(r"[a-z_]+", name):
            known.update({name, name + "_total"} | {name + suffix for suffix in HISTOGRAM_SUFFIXES})
    return known


def test_the_promql_reader_finds_metrics_and_their_functions():
    found = selectors(
        'histogram_quantile(0.9, sum by (le, path) (rate(a_bucket{job=~"$job", x="}"}[$__rate_interval])))'
        " / (sum(b_total{y='z'}) or vector(0)) and on (instance) c"
    )
    assert [(s["name"], s["function"], s["range"]) for s in found] == [
        ("a_bucket", "rate", "[$__rate_interval]"),
        ("b_total", "sum", None),
        ("c", None, None),
    ]
    assert found[0]["matchers"] == 'job=~"$job",x="}"'


# --- the dashboard ---


def test_dashboard_is_one_step_importable_json():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "gunicorn-prometheus"
    assert dashboard["id"] is None and dashboard["title"] and dashboard["tags"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Importing substitutes the chosen datasource for ${DS_PROMETHEUS}: it becomes the variable's default.
    assert variables["datasource"]["current"]["value"] == "${" + ds_input["name"] + "}"
    # ...and the input is referenced nowhere else: panels follow the variable.
    assert DASHBOARD_PATH.read_text().count("${" + ds_input["name"] + "}") == 2  # current text and value


def test_every_panel_target_and_variable_uses_the_datasource_variable():
    dashboard = load_dashboard()
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target)
    query_variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in query_variables} == {"job", "instance", "app_name"}
    for variable in query_variables:
        assert variable["datasource"] == DATASOURCE, variable["name"]
    # no datasource named by a concrete uid anywhere
    uids = re.findall(r'"uid": "([^"]*)"', DASHBOARD_PATH.read_text())
    assert set(uids) == {"${datasource}", "gunicorn-prometheus"}, set(uids)


def test_template_variables():
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["job"]["definition"] == "label_values(gunicorn_master_up, job)"
    assert variables["instance"]["definition"] == 'label_values(gunicorn_master_up{job=~"$job"}, instance)'
    assert variables["app_name"]["definition"].startswith(
        "label_values(starlette_request_duration_seconds_count"
    )
    assert variables["app_name"]["definition"].endswith(", app_name)")
    for name in ("job", "instance", "app_name"):
        variable = variables[name]
        assert variable["query"]["query"] == variable["definition"]
        # multi-value and All become regexes: every selector matches them with =~
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"


def test_panels_have_unique_ids_and_titles():
    panels = all_panels(load_dashboard())
    assert len({p["id"] for p in panels}) == len(panels)
    titles = [p["title"] for p in panels]
    assert len(set(titles)) == len(titles)
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_the_panels_the_dashboard_promises():
    exprs = "\n".join(expressions(load_dashboard()))
    for fragment in (
        "sum by (path, status_code) (instance_path_status:starlette_requests:rate1m{",
        "sum(instance:starlette_requests_5xx:rate1m{",
        "histogram_quantile(0.95, sum by (le, path) ("
        "instance_path_le:starlette_request_duration_seconds_bucket:",
        "histogram_quantile(0.5, sum by (le) (rate(starlette_request_duration_seconds_bucket{",
        "histogram_quantile(0.95, sum by (le) (rate(starlette_request_duration_seconds_bucket{",
        "histogram_quantile(0.99, sum by (le) (rate(starlette_request_duration_seconds_bucket{",
        "starlette_requests_in_progress{",
        "gunicorn_workers_desired{",
        "gunicorn_workers_alive{",
        "gunicorn_workers_serving{",
        "increase(gunicorn_worker_boots_total{",
        "sum by (reason) (increase(gunicorn_worker_exits_total{",
        "rate(gunicorn_process_cpu_seconds_total{",
        "gunicorn_process_resident_memory_bytes{",
        "gunicorn_process_open_fds{",
        "gunicorn_process_threads{",
        "up{",
        # saturation
        "histogram_quantile(0.99, sum by (le, instance, process) ("
        "rate(gunicorn_worker_event_loop_lag_seconds_bucket{",
        "gunicorn_worker_threadpool_tokens_in_use{",
        "gunicorn_worker_threadpool_tokens_limit{",
        "gunicorn_worker_threadpool_waiting{",
        "gunicorn_listen_backlog{",
        "gunicorn_listen_backlog_limit{",
        # the metrics server's own health
        "gunicorn_metrics_scrape_duration_seconds{",
        "scrape_duration_seconds{",
        "gunicorn_metrics_files{",
        "gunicorn_metrics_series{",
        "rate(gunicorn_metrics_write_errors_total{",
        "rate(gunicorn_metrics_read_errors_total{",
    ):
        assert fragment in exprs, fragment
    rows = [panel["title"] for panel in load_dashboard()["panels"] if panel["type"] == "row"]
    assert rows == ["HTTP", "Workers", "Processes", "Saturation", "Metrics server"]


def test_the_latency_panel_shows_exemplars_from_the_raw_buckets():
    """Exemplars hang on the scraped bucket series: a panel over recorded series would have none."""
    (panel,) = [p for p in all_panels(load_dashboard()) if p["title"] == "Latency p50 / p95 / p99"]
    for target in panel["targets"]:
        assert target["exemplar"] is True
        assert "(rate(starlette_request_duration_seconds_bucket{" in target["expr"]


def recorded_series() -> set[str]:
    groups = yaml.safe_load(RULES_PATH.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def test_the_http_panels_read_the_recording_rules():
    recorded = recorded_series()
    reads = {s["name"] for expr in expressions(load_dashboard()) for s in selectors(expr) if ":" in s["name"]}
    assert reads <= recorded, reads - recorded
    assert {
        "instance:starlette_requests:rate1m",
        "instance:starlette_requests_5xx:rate1m",
        "instance_path_status:starlette_requests:rate1m",
        "instance_le:starlette_request_duration_seconds_bucket:rate1m",
        "instance_path_le:starlette_request_duration_seconds_bucket:rate1m",
    } <= reads


def test_every_rate_and_increase_uses_rate_interval_and_no_window_is_fixed():
    for expr in expressions(load_dashboard()):
        for selector in selectors(expr):
            if selector["function"] in RANGE_FUNCTIONS:
                assert selector["range"] == "[$__rate_interval]", expr
        # no [1m], [5m], subqueries or offsets: every range in the query is $__rate_interval
        assert set(re.findall(r"\[[^\]]*\]", expr)) <= {"[$__rate_interval]"}, expr
        assert " offset " not in expr, expr


def test_counters_appear_only_inside_rate_or_increase():
    counters = {name for name, kind in readme_metrics().items() if kind == "counter"}
    seen = set()
    for expr in expressions(load_dashboard()):
        for selector in selectors(expr):
            if selector["name"].endswith("_total") or selector["name"] in counters:
                seen.add(selector["name"])
                assert selector["function"] in RANGE_FUNCTIONS, (selector["name"], expr)
            if selector["name"].endswith("_bucket"):  # histogram buckets are counters too
                assert selector["function"] in RANGE_FUNCTIONS, (selector["name"], expr)
    # (starlette_requests_total is read through the recording rules, which rate() it themselves)
    assert "gunicorn_worker_exits_total" in seen and "gunicorn_process_cpu_seconds_total" in seen


def test_every_metric_in_the_dashboard_is_documented_planned_or_recorded():
    dashboard = load_dashboard()
    known = known_series()
    queries = expressions(dashboard)
    queries += [
        re.fullmatch(r"label_values\((.*), \w+\)", v["definition"]).group(1)
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    for expr in queries:
        names = [s["name"] for s in selectors(expr)]
        assert names, expr
        for name in names:
            assert name in known, f"{name} (in {expr}) is in no metric table of the README nor in names.py"


def test_every_selector_follows_the_job_and_instance_variables():
    for title, target in panel_targets(load_dashboard()):
        for selector in selectors(target["expr"]):
            assert 'job=~"$job"' in selector["matchers"], (title, target["expr"])
            assert 'instance=~"$instance"' in selector["matchers"], (title, target["expr"])
            if selector["name"].startswith("starlette_"):
                assert 'app_name=~"$app_name"' in selector["matchers"], (title, target["expr"])


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query (after Grafana's substitutions) as a recording rule: offline, no server."""
    promtool = shutil.which("promtool")
    assert promtool, "the Debian package `prometheus` (promtool) is missing: run scripts/install --test"
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, expr in enumerate(expressions(load_dashboard()))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        .replace("$app_name", ".*")
    )


# --- docker-compose.yml, deploy/, grafana/provisioning/ ---


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((REPO / relative).read_text())


def seconds(duration: str | int) -> float:
    if isinstance(duration, int):
        return duration
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_builds_the_image_and_publishes_both_ports():
    app = load_yaml("docker-compose.yml")["services"]["app"]
    assert app["build"] == {"context": ".", "dockerfile": "image/Dockerfile"}
    assert (REPO / app["build"]["dockerfile"]).is_file()
    ports = {str(p).rsplit(":", 1)[-1] for p in app["ports"]}
    assert {"80", str(METRICS_PORT)} <= ports
    assert "healthcheck" not in app  # the image's HEALTHCHECK (/healthz) applies


def test_compose_stop_grace_exceeds_graceful_timeout():
    app = load_yaml("docker-compose.yml")["services"]["app"]
    environment = app.get("environment") or {}
    graceful = int(environment.get("GRACEFUL_TIMEOUT", DEFAULT_GRACEFUL_TIMEOUT))
    assert seconds(app["stop_grace_period"]) >= graceful + GRACE_MARGIN


def test_compose_prometheus_scrapes_the_metrics_port_and_grafana_is_provisioned():
    services = load_yaml("docker-compose.yml")["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = load_yaml("deploy/prometheus.yml")
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"app:{METRICS_PORT}" in targets

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    for source in mounts:
        assert (REPO / source).exists(), source
    dashboard_dir = load_yaml("grafana/provisioning/dashboards/gunicorn-prometheus.yml")["providers"][0]
    assert mounts["./grafana/dashboard.json"].startswith(dashboard_dir["options"]["path"] + "/")
    assert mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    (datasource,) = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    # $__rate_interval needs the scrape interval to cover at least 4 scrapes
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_compose_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    assert promtool, "the Debian package `prometheus` (promtool) is missing: run scripts/install --test"
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(REPO / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- k8s/ ---


def k8s_documents() -> dict[str, dict]:
    kustomization = load_yaml("k8s/kustomization.yaml")
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in (REPO / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    return {
        doc["kind"]: doc for name in listed for doc in yaml.safe_load_all((REPO / "k8s" / name).read_text())
    }


@pytest.fixture
def container() -> dict:
    (only,) = k8s_documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


def test_k8s_container_ports(container):
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 80,
        "metrics": METRICS_PORT,
    }


def test_k8s_probes_ask_healthz_on_the_metrics_port(container):
    for probe in ("readinessProbe", "livenessProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == "/healthz", probe
        assert named_port(container, http_get["port"]) == METRICS_PORT, probe


def test_k8s_grace_period_exceeds_graceful_timeout(container):
    pod = k8s_documents()["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    graceful = int(env.get("GRACEFUL_TIMEOUT", DEFAULT_GRACEFUL_TIMEOUT))
    assert pod["terminationGracePeriodSeconds"] >= graceful + GRACE_MARGIN


def test_k8s_cpu_limit_sizes_the_workers(container):
    assert container["resources"]["limits"]["cpu"]


def test_k8s_scrape_annotations():
    annotations = k8s_documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_k8s_service_exposes_both_ports_and_selects_the_pods(container):
    docs = k8s_documents()
    service = docs["Service"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"http", "metrics"}
    assert ports["metrics"]["port"] == METRICS_PORT
    assert named_port(container, ports["metrics"]["targetPort"]) == METRICS_PORT
    assert named_port(container, ports["http"]["targetPort"]) == 80
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_service_monitor_scrapes_the_metrics_port():
    docs = k8s_documents()
    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


# kubernetes-validate checks the core kinds (Deployment, Service, PodDisruptionBudget,
# HorizontalPodAutoscaler) against the Kubernetes OpenAPI schemas, offline. It has no schemas for custom
# resources (ServiceMonitor, PodMonitor, PrometheusRule: monitoring.coreos.com): those are checked by
# shape only, by the tests above and below and by tests/unit/test_rules.py.
CUSTOM_API_GROUPS = ("monitoring.coreos.com/", "kustomize.config.k8s.io/")
KUBERNETES_VALIDATE = VENV_BIN / "kubernetes-validate"


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    assert KUBERNETES_VALIDATE.exists(), "kubernetes-validate is missing: run scripts/install --test"
    return subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", *map(str, paths)], capture_output=True, text=True, timeout=120
    )


def core_manifests() -> list[Path]:
    found = []
    for path in sorted((REPO / "k8s").rglob("*.yaml")):
        kinds = {
            doc["apiVersion"].startswith(CUSTOM_API_GROUPS) for doc in yaml.safe_load_all(path.read_text())
        }
        if kinds == {False}:
            found.append(path)
        else:
            assert kinds == {True}, f"{path}: keep core and custom resources in separate files"
    return found


def test_k8s_core_manifests_pass_kubernetes_validate_strict():
    manifests = core_manifests()
    assert {p.name for p in manifests} == {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"}
    result = kubernetes_validate(*manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in manifests:
        assert f"{path} passed for resource" in result.stdout + result.stderr, (path, result.stdout)


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    """The check above can fail: a misspelt field in the Deployment is refused."""
    deployment = load_yaml("k8s/deployment.yaml")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = kubernetes_validate(path)
    assert result.returncode != 0 and "terminationGracePeriod" in result.stdout + result.stderr


def test_k8s_hpa_scales_the_deployment_and_its_variant_is_valid(tmp_path):
    docs = k8s_documents()
    hpa, deployment = docs["HorizontalPodAutoscaler"], docs["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"]  # the HPA owns the count; apply must not reset it
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # the commented prometheus-adapter variant, uncommented, is a valid HPA too
    text = (REPO / "k8s" / "hpa.yaml").read_text()
    block = text.split("# variant-begin\n", 1)[1].split("# variant-end", 1)[0]
    variant = yaml.safe_load("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    hpa["spec"]["metrics"] = variant["metrics"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "starlette_requests_in_progress"
    path = tmp_path / "hpa-variant.yaml"
    path.write_text(yaml.safe_dump(hpa))
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_pdb_keeps_a_pod_serving_and_lets_drains_proceed():
    docs = k8s_documents()
    pdb = docs["PodDisruptionBudget"]
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # minAvailable below the fewest replicas the HPA keeps, or a drain could never evict a pod
    assert 1 <= pdb["spec"]["minAvailable"] < docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]


def test_k8s_pod_monitor_alternative_scrapes_the_metrics_port(container):
    monitor = load_yaml("k8s/alternatives/podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    pod_labels = k8s_documents()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert named_port(container, endpoint["port"]) == METRICS_PORT and endpoint["path"] == "/metrics"
