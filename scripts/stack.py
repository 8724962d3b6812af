"""Run the three services as local processes: start, wait for health, stop.

Used by `make up` / `make down`, by the demo, and by the integration tests, so the stack is
started the same way everywhere. Logs and pid files live under one run directory.

    python -m scripts.stack up [--run-dir run]      # background processes, logs in run/logs/
    python -m scripts.stack status
    python -m scripts.stack down
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("indexer", "embedder", "gateway")  # start order: downstreams first
DEFAULT_PORTS = {"gateway": 50050, "embedder": 50051, "indexer": 50052}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The health status name of ``service`` at ``address`` ("UNREACHABLE" if no answer)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_healthy(address: str, timeout: float = 120.0, process: subprocess.Popen | None = None,
                 log_path: Path | None = None) -> None:
    """Block until the server at ``address`` reports SERVING; fail early if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"service at {address} exited with {process.returncode}:\n{tail}")
        if health_status(address) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"service at {address} not SERVING after {timeout:.0f}s")


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


def spawn(name: str, port: int, log_path: Path, env: dict[str, str] | None = None,
          args: list[str] | None = None) -> ServiceProcess:
    """Start ``python -m services.<name> --port PORT`` with its output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", "--host", "127.0.0.1", "--port", str(port),
             *(args or [])],
            cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    return ServiceProcess(name, port, process, log_path)


def stack_env(run_dir: Path, ports: dict[str, int], artifact_dir: Path | None = None) -> dict:
    """Environment wiring the three services together on loopback."""
    env = {
        "EMBEDDER_ADDR": f"127.0.0.1:{ports['embedder']}",
        "INDEXER_ADDRS": f"127.0.0.1:{ports['indexer']}",
        "INDEXER_DATA_DIR": str(run_dir / "indexer"),
        "GATEWAY_DB": str(run_dir / "catalogue.sqlite3"),
    }
    if artifact_dir is not None:
        env["EMBEDDER_ARTIFACT_DIR"] = str(artifact_dir)
    return env


def up(run_dir: Path, env: dict[str, str] | None = None, timeout: float = 180.0) -> dict[str, ServiceProcess]:
    """Start indexer, embedder and gateway in the background and wait until all are SERVING."""
    ports = {name: int(os.environ.get(f"{name.upper()}_PORT", DEFAULT_PORTS[name])) for name in SERVICES}
    full_env = {**stack_env(run_dir, ports), **(env or {})}
    started: dict[str, ServiceProcess] = {}
    try:
        for name in SERVICES:
            proc = spawn(name, ports[name], run_dir / "logs" / f"{name}.log", full_env)
            (run_dir / f"{name}.pid").write_text(str(proc.process.pid))
            started[name] = proc
        for proc in started.values():
            wait_healthy(proc.address, timeout, proc.process, proc.log_path)
    except Exception:
        for proc in started.values():
            proc.stop()
        raise
    return started


def down(run_dir: Path, timeout: float = 15.0) -> None:
    """Stop the services whose pid files are in ``run_dir`` (gateway first)."""
    for name in reversed(SERVICES):
        pid_file = run_dir / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file.unlink()
        print(f"stopped {name} (pid {pid})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local stack of embedder, indexer and gateway")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=REPO / "run")
    args = parser.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "up":
        for name, proc in up(args.run_dir).items():
            print(f"{name:9s} {proc.address:22s} pid {proc.process.pid}  log {proc.log_path}")
    elif args.command == "down":
        down(args.run_dir)
    else:
        for name in SERVICES:
            port = int(os.environ.get(f"{name.upper()}_PORT", DEFAULT_PORTS[name]))
            print(f"{name:9s} 127.0.0.1:{port:<6d} {health_status(f'127.0.0.1:{port}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
