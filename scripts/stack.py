"""Run the three services and the HTTP edge as local processes: start, wait for health, stop.

Used by `make up` / `make down`, by the demo, and by the integration tests, so the stack is
started the same way everywhere. Logs and pid files live under one run directory.

    python -m scripts.stack up [--run-dir run]      # background processes, logs in run/logs/
    python -m scripts.stack up --db postgres        # PostgreSQL in run/postgres + two gateways
    python -m scripts.stack status
    python -m scripts.stack down

``up`` serves the model in ``artifacts/current`` (or ``--artifact-dir`` / EMBEDDER_ARTIFACT_DIR)
and, the first time (empty catalogue), loads the prepared listings of ``build/data`` into the
gateway's catalogue and indexes their photos: the artefact's precomputed embeddings when it has
them, else through the running embedder. Later ``up``s keep whatever the stack holds. The
prepared photos missing from the image store (``run/images``, shared by the gateway and the edge)
are linked into it on every ``up``. ``up`` ends by printing the page's address (the edge,
``services.web``, on WEB_PORT, default 8000).

``--db postgres`` (``make up DB=postgres``) starts a PostgreSQL server from the machine's
packages with its data in ``run/postgres/`` (port ``POSTGRES_PORT``, 50057), keeps the catalogue
in its database ``catalogue`` and starts two gateway replicas on it (``GATEWAY_PORT`` and
``GATEWAY2_PORT``, 50050 and 50056): a listing added through one is served by the other. The
edge is given both (``GATEWAY_ADDR=ipv4:127.0.0.1:50050,127.0.0.1:50056``) and spreads its calls
over them with gRPC's round_robin, so it keeps serving while either replica is down.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.metrics import DEFAULT_PORTS as DEFAULT_METRICS_PORTS
from common.artifact import CARD_FILE
from common.prepared_data import IMAGES_FILE, LISTINGS_FILE
from marketplace.gateway.v1 import gateway_pb2

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("indexer", "embedder", "gateway", "web")  # start order: downstreams first
#: Services that answer HTTP (health: GET /api/health) rather than the gRPC health service.
HTTP_SERVICES = ("web",)
#: The gateway's readiness entry (SERVING while its downstreams are; services.gateway.readiness).
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
DEFAULT_PORTS = {"gateway": 50050, "embedder": 50051, "indexer": 50052, "web": 8000}
#: Extra gateway replicas (``--db postgres``): pid-file name -> (port variable, default port).
GATEWAY_REPLICAS = {"gateway-2": ("GATEWAY2_PORT", 50056)}
POSTGRES_PORT = ("POSTGRES_PORT", 50057)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(address: str, timeout: float = 1.0) -> str:
    """SERVING when the HTTP edge at ``address`` answers its health endpoint, else UNREACHABLE."""
    try:
        with urllib.request.urlopen(f"http://{address}/api/health", timeout=timeout) as reply:
            return "SERVING" if reply.status == 200 else "UNREACHABLE"
    except (OSError, urllib.error.URLError):
        return "UNREACHABLE"


def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The health status name of ``service`` at ``address`` ("UNREACHABLE" if no answer)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_healthy(
    address: str,
    timeout: float = 120.0,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
    service: str = "",
    http: bool = False,
) -> None:
    """Block until ``service`` at ``address`` reports SERVING (``http``: the edge's health
    endpoint answers); fail early if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"service at {address} exited with {process.returncode}:\n{tail}")
        status = http_status(address) if http else health_status(address, service)
        if status == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{service or 'service'} at {address} not SERVING after {timeout:.0f}s")


def wait_ready(proc: "ServiceProcess", timeout: float = 120.0) -> None:
    """`wait_healthy`; for a gateway on its readiness entry, SERVING once it reaches every
    downstream over its own channels, so a first request does not meet a channel that is still
    backing off from a downstream that was not up yet."""
    wait_healthy(
        proc.address,
        timeout,
        proc.process,
        proc.log_path,
        GATEWAY_SERVICE if proc.name == "gateway" else "",
        http=proc.name in HTTP_SERVICES,
    )


@dataclass
class ServiceProcess:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def spawn(
    name: str,
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    module: str | None = None,
    metrics_port: int = 0,
) -> ServiceProcess:
    """Start ``python -m services.<name> --port PORT`` (or ``python -m <module>``, e.g. a
    benchmark's stand-in server) with its output in ``log_path``. A service's Prometheus
    ``/metrics`` endpoint is off unless ``metrics_port`` is given: processes started side by side
    (tests, shards on one host) must not all bind the default metrics port."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    metrics = [] if module or name not in DEFAULT_METRICS_PORTS else ["--metrics-port", str(metrics_port)]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module or f"services.{name}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *metrics,
                *(args or []),
            ],
            cwd=REPO,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ServiceProcess(name, port, process, log_path)


def stack_env(run_dir: Path, ports: dict[str, int], artifact_dir: Path | None = None) -> dict:
    """Environment wiring the three services and the edge together on loopback."""
    env = {
        "GATEWAY_ADDR": f"127.0.0.1:{ports['gateway']}",
        "IMAGE_STORE_DIR": str(run_dir / "images"),
        "EMBEDDER_ADDR": f"127.0.0.1:{ports['embedder']}",
        "INDEXER_ADDRS": f"127.0.0.1:{ports['indexer']}",
        "INDEXER_DATA_DIR": str(run_dir / "indexer"),
        "GATEWAY_DB": str(run_dir / "catalogue.sqlite3"),
    }
    if artifact_dir is not None:
        env["EMBEDDER_ARTIFACT_DIR"] = str(artifact_dir)
    return env


def gateway_target(ports: list[int]) -> str:
    """The gRPC target of the local gateway replicas: ``127.0.0.1:p`` for one, else
    ``ipv4:127.0.0.1:p1,127.0.0.1:p2`` (a client with round_robin uses every address)."""
    addresses = [f"127.0.0.1:{port}" for port in ports]
    return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)


def up(
    run_dir: Path, env: dict[str, str] | None = None, timeout: float = 180.0, *, gateways: int = 1
) -> dict[str, ServiceProcess]:
    """Start indexer, embedder, gateway (``gateways`` replicas of it, on one shared catalogue) and
    the edge in the background and wait until all are SERVING."""
    ports = {name: int(os.environ.get(f"{name.upper()}_PORT", DEFAULT_PORTS[name])) for name in SERVICES}
    metrics_ports = {
        name: int(os.environ.get(f"{name.upper()}_METRICS_PORT", default))
        for name, default in DEFAULT_METRICS_PORTS.items()
    }
    full_env = {**stack_env(run_dir, ports), **(env or {})}
    started: dict[str, ServiceProcess] = {}
    replicas = list(GATEWAY_REPLICAS.items())[: max(0, gateways - 1)]
    # the edge reaches every gateway replica (gRPC round_robin over the list), so it keeps
    # serving while one of them is down
    edge_env = {
        **full_env,
        "GATEWAY_ADDR": gateway_target(
            [
                ports["gateway"],
                *(int(os.environ.get(variable, default)) for _, (variable, default) in replicas),
            ]
        ),
    }
    try:
        for name in SERVICES:
            if name == "web":  # last: after every gateway replica
                for key, (variable, default) in replicas:
                    proc = spawn(
                        "gateway",
                        int(os.environ.get(variable, default)),
                        run_dir / "logs" / f"{key}.log",
                        full_env,
                    )
                    (run_dir / f"{key}.pid").write_text(str(proc.process.pid))
                    started[key] = proc
            proc = spawn(
                name,
                ports[name],
                run_dir / "logs" / f"{name}.log",
                edge_env if name == "web" else full_env,
                metrics_port=metrics_ports.get(name, 0),
            )
            (run_dir / f"{name}.pid").write_text(str(proc.process.pid))
            started[name] = proc
        for proc in started.values():
            wait_ready(proc, timeout)
    except Exception:
        for name, proc in started.items():
            proc.stop()
            (run_dir / f"{name}.pid").unlink(missing_ok=True)
        raise
    return started


def local_postgres(run_dir: Path):
    """The stack's PostgreSQL server (data in ``run_dir/postgres``), not started."""
    from scripts.postgres import LocalPostgres

    variable, default = POSTGRES_PORT
    return LocalPostgres(run_dir / "postgres", int(os.environ.get(variable, default)))


def start_postgres(run_dir: Path) -> str:
    """Start (or find running) the stack's PostgreSQL; returns the catalogue database's URL."""
    server = local_postgres(run_dir)
    if not server.running():
        server.start()
        print(f"postgres  127.0.0.1:{server.port:<6d} data {server.data}  log {server.log}")
    return server.create_database("catalogue", exist_ok=True)


def down(run_dir: Path, timeout: float = 15.0) -> None:
    """Stop the services whose pid files are in ``run_dir`` (gateways first), then the stack's
    PostgreSQL if it runs."""
    for key in [*reversed(GATEWAY_REPLICAS), *reversed(SERVICES)]:
        name = key.split("-")[0]
        pid_file = run_dir / f"{key}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        pid_file.unlink()
        if not _is_service(pid, name):  # exited already (its pid may now be someone else's)
            print(f"{name} (pid {pid}) was not running")
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            print(f"killed {key} (pid {pid}): it did not stop within {timeout:g}s of SIGTERM")
        else:
            print(f"stopped {key} (pid {pid})")
    if (run_dir / "postgres" / "data").exists():
        server = local_postgres(run_dir)
        if server.running():
            server.stop()
            print(f"stopped postgres (data kept in {server.data})")


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child of ours is reaped, a zombie counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: `make up` started it from another process
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_service(pid: int, name: str) -> bool:
    """Whether ``pid`` is alive and runs ``python -m services.<name>``."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"services.{name}".encode() in command


def bootstrap_catalogue(db_path: Path | str, prepared: Path) -> bool:
    """Load ``prepared`` into an empty catalogue (True when it did); a catalogue that already
    holds listings is left alone, so listings added or removed through the gateway stay so."""
    from services.gateway.catalogue import Catalogue

    with Catalogue.open(db_path) as catalogue:
        held = catalogue.count()
        if held:
            print(f"catalogue {db_path}: {held:,} listings kept (not reloaded)")
            return False
        if not (prepared / LISTINGS_FILE).is_file():
            print(
                f"catalogue {db_path} is empty and there is no prepared data at {prepared}: "
                "run `make demo` (or python -m training.prepare) and `make up` again, or add "
                "listings through the gateway"
            )
            return False
        report = catalogue.load_prepared(prepared)
    print(
        f"catalogue {db_path}: loaded {report.listings:,} listings and {report.images:,} photos "
        f"from {prepared}"
    )
    return True


def fill_image_store(store_dir: Path, prepared: Path) -> None:
    """Link the prepared photos missing from the image store into it (the page shows them)."""
    from common.image_store import LocalImageStore, fill_from_prepared

    if not (prepared / IMAGES_FILE).is_file():
        return
    report = fill_from_prepared(LocalImageStore(store_dir), prepared)
    print(
        f"image store {store_dir}: {report.added:,} prepared photos added, "
        f"{report.already_there:,} already there"
        + (f", {report.skipped:,} skipped (missing or not photos)" if report.skipped else "")
    )


def index_catalogue(
    db_path: Path | str, artifact_dir: Path, prepared: Path, procs: dict[str, "ServiceProcess"]
) -> None:
    """Index the catalogue's photos (and listing texts) into the running indexer(s)."""
    from services.gateway import index_catalogue as indexing

    indexers = ",".join(p.address for n, p in procs.items() if n.startswith("indexer"))
    source = (
        ["--artifact", str(artifact_dir)]
        if (artifact_dir / "embeddings").is_dir()
        else ["--prepared", str(prepared)]
    )
    code = indexing.main(
        ["--db", str(db_path), "--indexers", indexers, *source, "--embedder", procs["embedder"].address]
    )
    if code != 0:
        raise RuntimeError(f"indexing the catalogue failed (exit code {code})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local stack of embedder, indexer and gateway")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=REPO / "run")
    parser.add_argument(
        "--artifact-dir",
        type=Path,
        default=Path(os.environ.get("EMBEDDER_ARTIFACT_DIR") or REPO / "artifacts" / "current"),
        help="model artefact the embedder serves (env EMBEDDER_ARTIFACT_DIR; "
        "default artifacts/current, made by `make demo`)",
    )
    parser.add_argument(
        "--prepared",
        type=Path,
        default=REPO / "build" / "data",
        help="prepared data loaded into an empty catalogue on `up`",
    )
    parser.add_argument(
        "--db",
        choices=["sqlite", "postgres"],
        default=os.environ.get("DB") or "sqlite",
        help="catalogue: a SQLite file in the run directory and one gateway "
        "(default), or a local PostgreSQL server and two gateway replicas",
    )
    args = parser.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "up":
        artifact = args.artifact_dir.resolve()
        if not (artifact / CARD_FILE).is_file():
            print(
                f"no model artefact at {args.artifact_dir} ({CARD_FILE} missing): run "
                "`make demo` once, which trains and exports one to artifacts/current, or point "
                "EMBEDDER_ARTIFACT_DIR / --artifact-dir at an exported artefact",
                file=sys.stderr,
            )
            return 2
        postgres = args.db == "postgres"
        db_path = start_postgres(args.run_dir) if postgres else args.run_dir / "catalogue.sqlite3"
        bootstrapped = bootstrap_catalogue(db_path, args.prepared)
        fill_image_store(args.run_dir / "images", args.prepared)
        procs = up(
            args.run_dir,
            {"EMBEDDER_ARTIFACT_DIR": str(artifact), "GATEWAY_DB": str(db_path)},
            gateways=2 if postgres else 1,
        )
        for name, proc in procs.items():
            print(f"{name:9s} {proc.address:22s} pid {proc.process.pid}  log {proc.log_path}")
        if bootstrapped:
            index_catalogue(db_path, artifact, args.prepared, procs)
        print(f"page: http://{procs['web'].address}/  (JSON API: http://{procs['web'].address}/docs)")
    elif args.command == "down":
        down(args.run_dir)
    else:
        for name in SERVICES:
            port = int(os.environ.get(f"{name.upper()}_PORT", DEFAULT_PORTS[name]))
            address = f"127.0.0.1:{port}"
            status = http_status(address) if name in HTTP_SERVICES else health_status(address)
            line = f"{name:9s} {address:16s} {status}"
            if name == "gateway":  # readiness: are its downstreams serving?
                ready = health_status(address, GATEWAY_SERVICE)
                line += f"  (ready: {ready})"
            print(line)
        for key, (variable, default) in GATEWAY_REPLICAS.items():
            if (args.run_dir / f"{key}.pid").exists():
                port = int(os.environ.get(variable, default))
                print(
                    f"{key:9s} 127.0.0.1:{port:<6d} {health_status(f'127.0.0.1:{port}')}  "
                    f"(ready: {health_status(f'127.0.0.1:{port}', GATEWAY_SERVICE)})"
                )
        if (args.run_dir / "postgres" / "data").exists():
            server = local_postgres(args.run_dir)
            print(f"postgres  127.0.0.1:{server.port:<6d} {'RUNNING' if server.running() else 'STOPPED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
