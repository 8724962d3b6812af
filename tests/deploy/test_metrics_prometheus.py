"""The three services' metrics scraped by a real Prometheus (Debian's ``prometheus``; `.ci/run`
installs it when missing).

The embedder, two indexer shards and the gateway run as processes (``python -m services.<name>``)
with ``/metrics`` on free loopback ports; Prometheus runs on another free loopback port with a
generated configuration scraping them every second. The test sends a known number of requests of
each kind through the gateway, failing ones included, waits until every target has been scraped
twice since, and asks Prometheus's HTTP API: counts per method and code equal what was sent, each
latency histogram counts every request, the gateway's client-side counts of its downstream calls
equal what the downstreams counted, and the embedder's average batch size lies between 1 and its
configured maximum.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from scripts.stack import ServiceProcess, free_port, spawn, wait_ready
from tests.support.photos import real_photos

pytestmark = pytest.mark.timeout(600)

GATEWAY = "marketplace.gateway.v1.Gateway"
EMBEDDER = "marketplace.embedder.v1.Embedder"
INDEXER = "marketplace.indexer.v1.Indexer"
BATCH_SIZE = 4
SCRAPE_INTERVAL_S = 1
CATEGORY = "Home & Garden"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if found is None:
        pytest.fail("the prometheus binary is missing: apt-get install prometheus (bash .ci/run installs it)")
    return found


def prometheus_config(jobs: dict[str, list[int]]) -> str:
    """Prometheus's YAML (JSON is YAML) scraping each job's loopback ports every second."""
    return json.dumps(
        {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
                for job, ports in jobs.items()
            ],
        },
        indent=2,
    )


class Prometheus:
    """A Prometheus server on a free loopback port, asked through its HTTP API."""

    def __init__(self, root: Path, jobs: dict[str, list[int]]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(prometheus_config(jobs))
        self.port = free_port()
        self.log_path = root / "prometheus.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"prometheus not ready in {timeout} s")

    def last_scrapes(self) -> dict[str, tuple[str, str]]:
        """scrape URL -> (last scrape time as Prometheus reports it, health)."""
        targets = self.get("/api/v1/targets")["data"]["activeTargets"]
        return {t["scrapeUrl"]: (t["lastScrape"], t["health"]) for t in targets}

    def wait_for_scrapes(self, count: int, expected_targets: int, timeout: float = 60) -> None:
        """Block until every target was scraped ``count`` more times, each successfully."""
        deadline = time.monotonic() + timeout
        seen = self.last_scrapes()
        changes = dict.fromkeys(seen, 0)
        while min(changes.values(), default=0) < count or len(changes) < expected_targets:
            if time.monotonic() > deadline:
                pytest.fail(f"targets not scraped {count} times in {timeout} s: {seen}")
            time.sleep(0.2)
            now = self.last_scrapes()
            for url, (when, health) in now.items():
                if when != seen.get(url, ("", ""))[0]:
                    assert health == "up", f"scrape of {url} failed: {now[url]}"
                    changes[url] = changes.get(url, 0) + 1
            seen = now

    def query(self, promql: str) -> list[dict]:
        reply = self.get("/api/v1/query", query=promql)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def by(self, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        """An instant vector as {label values: value}."""
        return {
            tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in self.query(promql)
        }

    def scalar(self, promql: str) -> float:
        result = self.query(promql)
        assert len(result) == 1, f"{promql}: {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, test_artifact):
    root = tmp_path_factory.mktemp("metrics")
    metrics_ports = {name: free_port() for name in ("embedder", "indexer-0", "indexer-1", "gateway")}
    procs: dict[str, ServiceProcess] = {}
    prometheus = None
    try:
        for shard in (0, 1):
            procs[f"indexer-{shard}"] = spawn(
                "indexer",
                free_port(),
                root / f"indexer-{shard}.log",
                {
                    "INDEXER_DATA_DIR": str(root / f"indexer-{shard}"),
                    "LOG_LEVEL": "warning",
                    "INDEXER_COLLECTIONS": "image:1280:flat:ip",
                    "INDEXER_FSYNC": "false",
                    "WRITE_TOKEN": "",
                },
                metrics_port=metrics_ports[f"indexer-{shard}"],
            )
        procs["embedder"] = spawn(
            "embedder",
            free_port(),
            root / "embedder.log",
            {
                "EMBEDDER_ARTIFACT_DIR": str(test_artifact),
                "EMBEDDER_TEXT_MODEL": "off",
                "EMBEDDER_BATCH_SIZE": str(BATCH_SIZE),
                "LOG_LEVEL": "warning",
            },
            metrics_port=metrics_ports["embedder"],
        )
        procs["gateway"] = spawn(
            "gateway",
            free_port(),
            root / "gateway.log",
            {
                "GATEWAY_DB": str(root / "catalogue.sqlite3"),
                "EMBEDDER_ADDR": procs["embedder"].address,
                "INDEXER_ADDRS": f"{procs['indexer-0'].address},{procs['indexer-1'].address}",
                "GATEWAY_READINESS_INTERVAL_S": "1",
                "WRITE_TOKEN": "",
                "LOG_LEVEL": "warning",
            },
            metrics_port=metrics_ports["gateway"],
        )
        prometheus = Prometheus(
            root / "prometheus",
            {
                "gateway": [metrics_ports["gateway"]],
                "embedder": [metrics_ports["embedder"]],
                "indexer": [metrics_ports["indexer-0"], metrics_ports["indexer-1"]],
            },
        )
        for proc in procs.values():
            wait_ready(proc, 300)
        prometheus.wait_ready()
        yield procs, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        for proc in reversed(list(procs.values())):
            proc.stop(30)


def listing(title: str) -> gateway_pb2.Listing:
    return gateway_pb2.Listing(
        title=title,
        description="metrics test",
        main_category=CATEGORY,
        price=10.0,
        currency="GBP",
        location="Leeds",
    )


def expect_code(call, request, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=60)
    assert raised.value.code() == code, raised.value.details()


def test_prometheus_sees_exactly_the_requests_sent(stack):
    procs, prometheus = stack
    photos = real_photos(4)
    with grpc.insecure_channel(procs["gateway"].address) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        # the first listing has 3 photos: one Embed call, one model batch of 3
        images_per_listing = [photos[:3], [photos[1]], [photos[2]]]
        added = [
            gateway.AddListing(
                gateway_pb2.AddListingRequest(listing=listing(f"metrics {i}"), images=images), timeout=120
            ).listing.id
            for i, images in enumerate(images_per_listing)
        ]
        for i in range(5):
            reply = gateway.SearchByImage(
                gateway_pb2.SearchByImageRequest(image=photos[i % 4], k=3), timeout=60
            )
            assert reply.results
        for _ in range(2):
            gateway.ClassifyImage(gateway_pb2.ClassifyImageRequest(image=photos[3]), timeout=60)
        for listing_id in added[:2]:
            gateway.GetListing(gateway_pb2.GetListingRequest(listing_id=listing_id), timeout=30)
        for i in range(3):
            expect_code(
                gateway.GetListing,
                gateway_pb2.GetListingRequest(listing_id=f"none-{i}"),
                grpc.StatusCode.NOT_FOUND,
            )
        for _ in range(2):  # the embedder refuses the bytes; the gateway passes that on
            expect_code(
                gateway.SearchByImage,
                gateway_pb2.SearchByImageRequest(image=b"not a photo", k=3),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        expect_code(
            gateway.SearchByImage,  # refused by the gateway itself, k > GATEWAY_MAX_K
            gateway_pb2.SearchByImageRequest(image=photos[0], k=100_000),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    sent = {
        ("AddListing", "OK"): 3,
        ("SearchByImage", "OK"): 5,
        ("SearchByImage", "INVALID_ARGUMENT"): 3,
        ("ClassifyImage", "OK"): 2,
        ("GetListing", "OK"): 2,
        ("GetListing", "NOT_FOUND"): 3,
    }

    prometheus.wait_for_scrapes(2, expected_targets=4)

    # The gateway: every request counted under its method and code, none elsewhere.
    handled = prometheus.by(
        f'sum by (grpc_method, grpc_code) (grpc_server_handled_total{{job="gateway",'
        f'grpc_service="{GATEWAY}"}}) > 0',
        "grpc_method",
        "grpc_code",
    )
    assert handled == sent
    started = prometheus.by(
        f'grpc_server_started_total{{job="gateway",grpc_service="{GATEWAY}"}} > 0', "grpc_method"
    )
    per_method: dict[tuple[str], float] = {}
    for (method, _code), count in sent.items():
        per_method[(method,)] = per_method.get((method,), 0) + count
    assert started == per_method
    histogram = prometheus.by(
        f'grpc_server_handling_seconds_count{{job="gateway",grpc_service="{GATEWAY}"}} > 0', "grpc_method"
    )
    assert histogram == per_method
    assert (
        prometheus.by(
            f'grpc_server_handling_seconds_bucket{{job="gateway",grpc_service="{GATEWAY}",le="+Inf"}} > 0',
            "grpc_method",
        )
        == per_method
    )
    # methods never called are there with zero counts (rate() and ratios work from the start)
    assert prometheus.scalar('grpc_server_started_total{job="gateway",grpc_method="Recommend"}') == 0

    # The gateway's view of each downstream call equals what that downstream counted.
    for job, service in (("embedder", EMBEDDER), ("indexer", INDEXER)):
        server_side = prometheus.by(
            f'sum by (grpc_method, grpc_code) (grpc_server_handled_total{{job="{job}",'
            f'grpc_service="{service}"}}) > 0',
            "grpc_method",
            "grpc_code",
        )
        client_side = prometheus.by(
            f'sum by (grpc_method, grpc_code) (grpc_client_handled_total{{job="gateway",'
            f'grpc_service="{service}"}}) > 0',
            "grpc_method",
            "grpc_code",
        )
        assert server_side and client_side == server_side, job
    embedder_calls = prometheus.by(
        f'grpc_server_handled_total{{job="embedder",grpc_service="{EMBEDDER}"}} > 0',
        "grpc_method",
        "grpc_code",
    )
    assert embedder_calls[("Embed", "OK")] == 3 + 5  # 3 listings, 5 searches
    assert embedder_calls[("Embed", "INVALID_ARGUMENT")] == 2  # the two bad photos
    assert embedder_calls[("Classify", "OK")] == 2
    # every shard answered every successful search: one Search per shard and search
    shard_searches = prometheus.by(
        'grpc_server_handled_total{job="indexer",grpc_method="Search",grpc_code="OK"}', "instance"
    )
    assert sorted(shard_searches.values()) == [5, 5]
    assert prometheus.scalar('sum(grpc_server_handled_total{job="indexer",grpc_method="Upsert"})') == 3
    assert prometheus.scalar('sum(indexer_search_seconds_count{collection="image"})') == 10
    assert prometheus.scalar('sum(indexer_vectors{collection="image"})') == 5
    client_targets = prometheus.by(
        f'sum by (downstream) (grpc_client_handled_total{{job="gateway",grpc_service="{INDEXER}",'
        f'grpc_method="Search"}})',
        "downstream",
    )
    assert client_targets == {("indexer shard 0",): 5, ("indexer shard 1",): 5}

    # The embedder's batching: 12 photos in 10 requests went through the model, in batches of
    # 1..BATCH_SIZE; the 3-photo listing made at least one batch of more than 2.
    photos_embedded = 5 + 5 + 2
    assert prometheus.scalar("embedder_images_embedded_total") == photos_embedded
    assert prometheus.scalar("embedder_batch_size_sum") == photos_embedded
    average_batch = prometheus.scalar("embedder_batch_size_sum / embedder_batch_size_count")
    assert 1 < average_batch <= BATCH_SIZE
    assert prometheus.scalar('embedder_batch_size_bucket{le="2.0"}') < prometheus.scalar(
        "embedder_batch_size_count"
    )
    assert prometheus.scalar(f'embedder_batch_size_bucket{{le="{float(BATCH_SIZE)}"}}') == prometheus.scalar(
        "embedder_batch_size_count"
    )
    assert prometheus.scalar("embedder_queue_wait_seconds_count") == 3 + 5 + 2  # requests
    assert prometheus.scalar("embedder_model_seconds_count") == prometheus.scalar("embedder_batch_size_count")
    assert prometheus.scalar('count(embedder_model_info{backbone!=""})') == 1

    # The gateway's own state.
    assert prometheus.scalar("gateway_catalogue_listings") == 3
    assert prometheus.by("gateway_downstream_ready", "downstream") == {
        ("embedder",): 1,
        ("indexer shard 0",): 1,
        ("indexer shard 1",): 1,
    }


def readme_promql() -> list[str]:
    """The PromQL expressions of the README's metrics section, one per comment line above it."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("```promql\n", 1)[1].split("```", 1)[0]
    expressions: list[str] = []
    for line in block.splitlines():
        if line.startswith("#") or not line.strip():
            expressions.append("")
        elif line.startswith(" ") and expressions:
            expressions[-1] += " " + line.strip()
        else:
            expressions.append(line.strip())
    return [e for e in expressions if e]


def test_readme_promql_runs_on_the_scraped_metrics(stack):
    """Every query the README gives operators is valid PromQL and finds series (after the
    traffic of the test above: run in this module's order)."""
    _, prometheus = stack
    queries = readme_promql()
    assert len(queries) >= 5
    for promql in queries:
        result = prometheus.query(promql)
        assert result, f"README query found nothing: {promql}"
