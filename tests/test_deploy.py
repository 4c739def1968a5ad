"""deploy/: Prometheus config and alert rules (promtool, with rule unit tests), the Grafana dashboard,
compose and Kubernetes files — parsed, validated, and cross-checked against the metrics catalogue."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from duet.settings import Settings
from duet.wiring import engine_config
from serving.adapters import engine_lora_rank
from tests.test_metrics_catalogue import catalogue, code_metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "duet.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "duet.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (scripts/install-test-tools.sh)")


def metric_names(expr: str) -> set[str]:
    """duet_* series an expression reads, as catalogued (histogram suffixes dropped)."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bduet_[a-z0-9_]+", expr)}


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


# --- Prometheus ----------------------------------------------------------------------------------
@needs_promtool
def test_promtool_checks_config_and_rules(tmp_path):
    # the config names its rule files by their in-container path: check a copy pointing at ours
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    for args in (["check", "config", str(tmp_path / "prometheus.yml")], ["check", "rules", str(RULES)]):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_rules_unit_tests():
    out = subprocess.run([PROMTOOL, "test", "rules", "tests/duet_test.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_a_test_and_a_runbook():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "tests" / "duet_test.yml").read_text()))
    readme = (DEPLOY.parent / "README.md").read_text()
    assert alerts == tested
    assert {a for a in alerts if f"`{a}`" not in readme} == set(), "alerts without a runbook entry in README.md"
    want = {"DuetHighErrorRate", "DuetSlowTimeToFirstToken", "DuetNoVotes", "DuetConsumerLag", "DuetOutboxGrowing",
            "DuetGateRejectingRounds", "DuetSwapFailures", "DuetTrainerDown"}
    assert want <= alerts


def test_rules_and_dashboard_use_only_catalogued_metrics_the_code_defines():
    used = set().union(*(metric_names(e) for e in rule_exprs() + dashboard_exprs()))
    assert len(used) > 20
    assert used - set(catalogue()) == set(), "used but not in deploy/metrics.md"
    assert used - set(code_metrics()) == set(), "used but defined nowhere in the code"


# --- Grafana -------------------------------------------------------------------------------------
def test_grafana_dashboard_is_provisioned_against_the_prometheus_datasource():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/duet.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == ds["uid"] and p["targets"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("requests", "latency", "votes", "win rate", "reward model", "kl", "swaps", "lag", "outbox"):
        assert topic in titles, topic


# --- compose -------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose missing (scripts/install-test-tools.sh)")
    env = {"PATH": "/usr/bin:/bin", "DUET_MODEL": "m", "DUET_ADMIN_KEY": "a", "DUET_SECRET": "s",
           "GRAFANA_ADMIN_PASSWORD": "g"}
    out = subprocess.run([exe, "-f", str(DEPLOY / "compose" / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["services"]["serving"]["environment"]["DUET_KAFKA_REPLICATION"] == "3"
    # without its secrets the file refuses to start, saying which one is missing
    out = subprocess.run([exe, "-f", str(DEPLOY / "compose" / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "DUET_" in out.stderr


def test_compose_runs_kraft_kafka_redis_aof_gpus_and_monitoring():
    c = compose()
    svc = c["services"]
    for i in (1, 2, 3):
        env = svc[f"kafka-{i}"]["environment"]
        assert svc[f"kafka-{i}"]["image"].startswith("apache/kafka:")
        assert env["KAFKA_NODE_ID"] == i and "controller" in env["KAFKA_PROCESS_ROLES"]
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == 2 and env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == 3
    assert "--appendonly" in svc["redis"]["command"]
    for name in ("serving", "trainer"):
        devices = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert svc[name]["environment"]["DUET_KAFKA_MIN_INSYNC"] == "2"
    assert "registry:/registry:ro" in svc["serving"]["volumes"] and "registry:/registry" in svc["trainer"]["volumes"]
    assert {"prometheus", "alertmanager", "grafana"} <= set(svc)
    env_example = (DEPLOY / "compose" / ".env.example").read_text()
    assert re.search(r"^DUET_ADMIN_KEY=$", env_example, re.M) and re.search(r"^DUET_SECRET=$", env_example, re.M)


# --- Kubernetes ----------------------------------------------------------------------------------
def rendered(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl missing: kustomize overlays not rendered")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["gpu", "cpu-demo"])
def test_k8s_overlays_render_and_validate(overlay):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    docs = rendered(overlay)
    crds = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, "1.32.0", strict=True)
        except SchemaNotFoundError:
            crds.append(d["kind"])
    # The schema validator has no Strimzi or Prometheus Operator schemas: checked structurally below.
    assert sorted(set(crds)) == ["Kafka", "KafkaNodePool", "KafkaTopic", "PrometheusRule", "ServiceMonitor"]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_k8s_gpu_overlay_is_production_shaped():
    docs = rendered("gpu")
    [serving] = by_kind(docs, "Deployment")
    spec = serving["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert serving["spec"]["replicas"] >= 2
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["lifecycle"]["preStop"] and spec["terminationGracePeriodSeconds"] >= 40
    secrets = [e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e]
    assert secrets and set(secrets) == {"duet-secrets"} and not by_kind(docs, "Secret")
    [trainer] = [d for d in by_kind(docs, "StatefulSet") if d["metadata"]["name"] == "duet-trainer"]
    assert trainer["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    trainer_c = trainer["spec"]["template"]["spec"]["containers"][0]
    ranks = {e["name"]: e.get("value") for e in trainer_c["env"]}["DUET_TRAINER_RANKS"]
    assert trainer_c["resources"]["limits"]["nvidia.com/gpu"] == int(ranks) > 1  # one GPU per rank (torchrun)
    [kafka] = by_kind(docs, "Kafka")
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert kafka["spec"]["kafka"]["config"]["min.insync.replicas"] == 2
    [pool] = by_kind(docs, "KafkaNodePool")
    assert pool["spec"]["replicas"] == 3 and set(pool["spec"]["roles"]) == {"controller", "broker"}
    topics = {t["metadata"]["name"]: t["spec"] for t in by_kind(docs, "KafkaTopic")}
    from feedback.contract.topics import DEAD_LETTERS, FEEDBACK, WEIGHTS

    assert set(topics) == {FEEDBACK, DEAD_LETTERS, WEIGHTS}
    assert all(t["replicas"] == 3 and t["config"]["min.insync.replicas"] == 2 for t in topics.values())
    [config] = by_kind(docs, "ConfigMap")
    assert config["data"]["DUET_KAFKA_REPLICATION"] == "3" and config["data"]["DUET_KAFKA_MIN_INSYNC"] == "2"
    # users judge each version; its candidate is an adapter on the live engine (serving then starts it with LoRA)
    assert (config["data"]["DUET_CANARY"], config["data"]["DUET_CANARY_CANDIDATE"]) == ("users", "adapter")
    s = Settings(_env_file=None, **{k[5:].lower(): v for k, v in config["data"].items() if k.startswith("DUET_")})
    assert engine_config(s).max_lora_rank == engine_lora_rank(s.policy_lora_rank)
    [rule] = by_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    monitored = {ep["port"] for sm in by_kind(docs, "ServiceMonitor") for ep in sm["spec"]["endpoints"]}
    assert monitored == {"http", "relay-metrics", "metrics"}


def test_k8s_cpu_demo_overlay_shrinks_kafka_and_drops_gpus():
    docs = rendered("cpu-demo")
    [serving] = by_kind(docs, "Deployment")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert serving["spec"]["replicas"] == 1
    assert all(t["spec"]["replicas"] == 1 for t in by_kind(docs, "KafkaTopic"))
    [config] = by_kind(docs, "ConfigMap")
    assert config["data"]["DUET_KAFKA_REPLICATION"] == "1"
