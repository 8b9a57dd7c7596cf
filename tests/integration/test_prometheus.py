"""A real Prometheus (Debian's package) on loopback scrapes a real tritonserver and gateway under a short load, with
the shipped docker/prometheus.yml (only the targets point to loopback) and docker/prometheus-rules.yml. Every
dashboard and rule expression must parse and return data, and two alerts are provoked and must fire.

In `make test-slow`, not `make test`: it takes about 75 s on 2 cores, mostly waiting out the alerts' real `for:`
windows (30 s each) and the rate windows, over the ~60 s the default suite allows one test (docs/production.md)."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace

import pytest
import yaml

from bert_recsys import settings
from monitoring_queries import PROMETHEUS_CONFIG, RULES, dashboard_queries, needs_gpu, rules, tool_or_skip
from bert_recsys.server.launcher import free_port

pytestmark = pytest.mark.slow

EVALUATION_S = 5.0   # docker/prometheus.yml's scrape and evaluation interval (asserted below)
APP_KEY, NOISY_KEY = "app-key", "noisy-key"      # KeyStore names them key1 and key2


def prometheus_binary() -> str:
    return tool_or_skip("prometheus")


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list:
        """The instant query's result; a parse or evaluation error fails with Prometheus's message."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{expr!r}: {json.loads(error.read()).get('error')}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def alerts(self) -> dict[str, list[dict]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=30) as response:
            out: dict[str, list[dict]] = {}
            for alert in json.loads(response.read())["data"]["alerts"]:
                out.setdefault(alert["labels"]["alertname"], []).append(alert)
            return out

    def targets_up(self) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=30) as response:
            return {t["labels"]["job"]: t["health"] for t in json.loads(response.read())["data"]["activeTargets"]}


@pytest.fixture
def stack(export_dir, tmp_path):
    from bert_recsys.client.triton import TritonClient
    from bert_recsys.gateway.app import create_app
    from bert_recsys.gateway.background import BackgroundGateway
    from bert_recsys.gateway.config import GatewaySettings
    from bert_recsys.gateway.keys import KeyStore
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    binary = prometheus_binary()
    repo = build_repository(settings.SETTINGS, export_dir, "onnx-int8", "embedded", tmp_path / "repository")
    server_settings = on_free_ports(settings.SETTINGS.server, admin_key="test-admin-key")
    server = TritonServer(repo, server_settings, log_file=tmp_path / "triton.log").start()
    client = TritonClient(server_settings.grpc_url, settings=replace(settings.SETTINGS, server=server_settings))
    config = GatewaySettings(port=free_port(), triton_url=server_settings.grpc_url,
                             triton_http_url=server_settings.http_url, rate_rps=10, rate_texts_per_s=1000, burst_s=1.0,
                             events_db=None)
    gateway = BackgroundGateway(create_app(config, client, KeyStore.from_plaintext([APP_KEY, NOISY_KEY])), config.port)
    gateway.__enter__()

    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert shipped["global"]["scrape_interval"] == shipped["global"]["evaluation_interval"] == f"{EVALUATION_S:.0f}s"
    loopback = {"triton": f"127.0.0.1:{server_settings.metrics_port}", "gateway": f"127.0.0.1:{config.port}"}
    for job in shipped["scrape_configs"]:
        job["static_configs"] = [{"targets": [loopback[job["job_name"]]]}]
    shipped["rule_files"] = [str(RULES)]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(shipped))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen([binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.2)
        yield prometheus, server, gateway
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        gateway.__exit__(None, None, None)
        client.close()
        server.stop()


class Load:
    """Application traffic on key1; a noisy caller on key2 at twice its limit (429s); a caller with a wrong key
    (401s). Statuses are counted per caller."""

    def __init__(self, url: str):
        self.url, self.stop, self.statuses = url, threading.Event(), {}
        self.threads = [threading.Thread(target=self.caller, args=(name, key, period), daemon=True)
                        for name, key, period in (("app", APP_KEY, 0.2), ("noisy", NOISY_KEY, 0.05),
                                                  ("stranger", "not-a-key", 0.4))]

    def caller(self, name: str, key: str, period: float):
        body = json.dumps({"model": "embed", "input": ["a short text to embed", "and a second one"]}).encode()
        while not self.stop.is_set():
            request = urllib.request.Request(f"{self.url}/v1/embeddings", data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
                    status = response.status
            except urllib.error.HTTPError as error:
                error.read()
                status = error.code
            self.statuses.setdefault(name, {}).setdefault(status, 0)
            self.statuses[name][status] += 1
            self.stop.wait(period)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(1.0)
    return result


def firing(prometheus: Prometheus, name: str) -> list[dict]:
    return [a for a in prometheus.alerts().get(name, []) if a["state"] == "firing"]


def first_sample(prometheus: Prometheus, selector: str) -> float | None:
    """The unix time of the earliest sample of `selector` in the last 10 minutes (e.g. when an alert first went
    pending or firing, from Prometheus's own ALERTS series), or None."""
    times = [float(t) for series in prometheus.query(f"{selector}[10m]") for t, _ in series["values"]]
    return min(times) if times else None


def seconds(window: str) -> float:
    return float(window[:-1]) * {"s": 1, "m": 60, "h": 3600}[window[-1]]


def test_a_real_prometheus_reads_every_panel_and_rule_and_the_alerts_fire(stack):
    prometheus, server, gateway = stack
    alert_rules = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    recorded = [rule["record"] for rule in rules() if "record" in rule]
    with Load(gateway.url) as load:
        load_started = time.time()
        wait_for(lambda: prometheus.targets_up() == {"triton": "up", "gateway": "up"}, 30, "both targets up")
        # Two scrapes of traffic for every rate, then a rule evaluation over them.
        wait_for(lambda: prometheus.query("gateway:key_refusals:rate1m") and prometheus.query("triton:request_p99_us:max"),
                 60, "the first recorded series")
        time.sleep(max(0.0, 3 * EVALUATION_S - (time.time() - load_started)))

        # Phase 1, Triton up: everything but the 503s and the GPU panels has data.
        needs_outage = {"gateway:upstream_unavailable:rate1m"}
        gpu, empty = [], []
        for source, title, expr in dashboard_queries():
            if needs_gpu(expr):
                gpu.append(f"{source}: {title}")
                prometheus.query(expr)  # still parses
            elif not any(name in expr for name in needs_outage) and not prometheus.query(expr):
                empty.append(f"{source}: {title}: {expr}")
        for name, rule in ((r.get("record") or r["alert"], r) for r in rules()):
            prometheus.query(rule["expr"])  # parses and evaluates; what an alert watches is a recorded series
            if name in recorded and name not in needs_outage and not prometheus.query(name):
                empty.append(f"rule {name}: {rule['expr']}")
        assert empty == [], "no data for:\n" + "\n".join(empty)
        assert len(gpu) == 2, gpu  # needs a GPU: nv_gpu_* exist only where Triton sees one
        # The gateway's own scrapes are not traffic.
        assert prometheus.query('gateway_responses_total{route=~"/metrics|/health.*"}') == []
        assert {s["metric"]["key"] for s in prometheus.query("gateway:key_refusals:rate1m")} == {"key2", "none"}
        assert [s["value"][1] for s in prometheus.query("gateway:upstream_ready:min")] == ["1"]

        # Phase 2: tritonserver dies (SIGKILL: under load a SIGTERM waits up to 30 s for in-flight requests).
        killed = time.time()
        server.process.kill()
        server.stop()  # reaps its stubs and shared memory
        window = seconds(alert_rules["TritonNotReady"]["for"])
        wait_for(lambda: firing(prometheus, "TritonNotReady"), window + 4 * EVALUATION_S, "TritonNotReady firing")
        surge = wait_for(lambda: firing(prometheus, "RateLimitSurge"), 60, "RateLimitSurge firing")
        assert {a["labels"]["key"] for a in surge} == {"key2"}  # the noisy key's name, not the key
        wait_for(lambda: prometheus.query("gateway:upstream_unavailable:rate1m"), 4 * EVALUATION_S, "503s recorded")
        # Triton's p99 is gone with it, and the last good value stays, with its age.
        assert prometheus.query("triton:request_p99_us:max") == []
        (last,) = prometheus.query('last_over_time(triton:request_p99_us:max{model="encoder"}[1h])')
        (age,) = prometheus.query('time() - last_over_time(triton:request_p99_us:max:observed_at{model="encoder"}[1h])')
        assert float(last["value"][1]) > 0 and window - EVALUATION_S <= float(age["value"][1]) <= 120
        assert [s["value"][1] for s in prometheus.query("gateway:upstream_ready:min")] == ["0"]

    # When each alert went pending and firing, from Prometheus's ALERTS series.
    not_ready_fired = first_sample(prometheus, 'ALERTS{alertname="TritonNotReady", alertstate="firing"}')
    surge_window = seconds(alert_rules["RateLimitSurge"]["for"])
    surge_pending = first_sample(prometheus, 'ALERTS{alertname="RateLimitSurge", alertstate="pending"}')
    surge_fired = first_sample(prometheus, 'ALERTS{alertname="RateLimitSurge", alertstate="firing"}')
    # TritonNotReady: the next scrape finds Triton down, the next evaluation makes it pending, and it fires at the
    # first evaluation `for:` later.
    assert window <= not_ready_fired - killed <= window + 2 * EVALUATION_S + 2, not_ready_fired - killed
    # RateLimitSurge: pending once the targets are found, two scrapes of 429s are in and a rule evaluation ran over
    # them (a 1 m rate needs two samples); firing `for:` later.
    assert surge_pending - load_started <= 6 * EVALUATION_S, surge_pending - load_started
    assert surge_window <= surge_fired - surge_pending <= surge_window + EVALUATION_S + 1, surge_fired - surge_pending
    assert set(load.statuses["app"]) <= {200, 503} and 503 in load.statuses["app"], load.statuses
    assert 429 in load.statuses["noisy"] and set(load.statuses["stranger"]) == {401}, load.statuses
    print(f"\nTritonNotReady fired {not_ready_fired - killed:.1f} s after tritonserver was killed (for: {window:.0f} s); "
          f"RateLimitSurge pending {surge_pending - load_started:.1f} s after the noisy key started, firing "
          f"{surge_fired - surge_pending:.1f} s later (for: {surge_window:.0f} s); statuses {load.statuses}")
