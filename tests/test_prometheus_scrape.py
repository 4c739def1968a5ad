"""A real Prometheus (Debian's package) scrapes a running Duet serving app and a running trainer; the
test asks Prometheus' HTTP API which duet_ series it holds from each."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
PROMETHEUS = shutil.which("prometheus")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log) -> None:
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(lambda: answers() or proc.poll() is not None, timeout_s, f"{url} to answer", 0.5)
    assert proc.poll() is None, log.read_text()[-3000:]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing (scripts/install-test-tools.sh)")
def test_prometheus_scrapes_serving_and_trainer(duet_server, api_key, tmp_path):
    # some traffic, so request and latency series exist
    httpx.post(duet_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
               json={"model": "duet", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
    trainer_port = free_port()
    env = {**duet_server.env, "DUET_HOME": str(tmp_path / "trainer-home"), "DUET_TRAINER_METRICS_PORT": str(trainer_port),
           "DUET_TRAINER_GROUP_ID": "scrape-test"}
    trainer_log = tmp_path / "trainer.log"
    trainer = subprocess.Popen([sys.executable, "-m", "duet.cli", "train"], env=env, stdout=open(trainer_log, "w"),
                               stderr=subprocess.STDOUT)
    prom_port = free_port()
    serving = duet_server.url.removeprefix("http://")
    cfg = {"global": {"scrape_interval": "1s"},
           "scrape_configs": [{"job_name": "duet-serving", "static_configs": [{"targets": [serving]}]},
                              {"job_name": "duet-trainer", "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom_log = tmp_path / "prometheus.log"
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=open(prom_log, "w"), stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        wait_http(f"http://127.0.0.1:{trainer_port}/metrics", 120, trainer, trainer_log)
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready", 60, prom, prom_log)

        def series(job: str) -> set[str]:
            r = httpx.get(f"{api}/series", params={"match[]": f'{{job="{job}",__name__=~"duet_.+"}}'}, timeout=10)
            return {s["__name__"] for s in r.json()["data"]}

        wait_until(lambda: series("duet-serving") and series("duet-trainer"), 60,
                   "Prometheus to scrape duet_ series from both jobs", 1)
        up = httpx.get(f"{api}/query", params={"query": "up"}, timeout=10).json()["data"]["result"]
        assert {r["metric"]["job"]: r["value"][1] for r in up} == {"duet-serving": "1", "duet-trainer": "1"}
        served, trained = series("duet-serving"), series("duet-trainer")
        assert {"duet_http_requests_total", "duet_time_to_first_token_seconds_bucket", "duet_model_version_info",
                "duet_outbox_depth"} <= served
        assert {"duet_trainer_consumer_lag", "duet_rm_heldout_accuracy", "duet_gate_consecutive_rejections"} <= trained
        q = httpx.get(f"{api}/query", params={"query": 'sum(duet_http_requests_total{route="/v1/chat/completions"})'},
                      timeout=10).json()["data"]["result"]
        assert float(q[0]["value"][1]) >= 1
    finally:
        for p in (prom, trainer):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
