"""HTTP edge settings: environment variables, overridden by command-line flags.

``WEB_HOST`` [--host] (0.0.0.0)
    Interface to listen on.
``WEB_PORT`` [--port] (8000)
    Port of the page and the JSON API; 0 picks a free one.
``GATEWAY_ADDR`` [--gateway] (127.0.0.1:50050)
    The gateway (a gRPC target). TLS follows ``TLS_CA`` / ``TLS_CLIENT_*`` (`common.security`).
``IMAGE_STORE_DIR`` [--image-store] (run/images)
    The listing photo store the gateway fills (`common.image_store`); the edge serves from it.
``WEB_SEED_DIR`` [--seed-dir] (unset)
    A prepared-data folder whose photos are added to the store at start when missing (hard links
    where possible), so the catalogue's own photos can be shown.
``WEB_MAX_UPLOAD_MB`` (16)
    Largest request body accepted, in MiB; a bigger upload is 413 before it is read.
``WEB_GATEWAY_TIMEOUT_S`` (30)
    Deadline of each gateway call.
``LOG_LEVEL`` [--log-level] (info)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from common.config import REPO_ROOT, env_float, env_int, env_path, env_str


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 0
    gateway_addr: str = "127.0.0.1:50050"
    image_store_dir: Path = REPO_ROOT / "run" / "images"
    seed_dir: Path | None = None
    max_upload_bytes: int = 16 * 1024 * 1024
    gateway_timeout_s: float = 30.0
    log_level: str = "info"

    @classmethod
    def from_env(cls, argv: list[str] | None = None) -> "WebConfig":
        parser = argparse.ArgumentParser(prog="python -m services.web",
                                         description="HTTP edge: the page and the JSON API")
        parser.add_argument("--host", default=env_str("WEB_HOST", "0.0.0.0"))
        parser.add_argument("--port", type=int, default=env_int("WEB_PORT", 8000, minimum=0))
        parser.add_argument("--gateway", default=env_str("GATEWAY_ADDR", "127.0.0.1:50050"))
        parser.add_argument("--image-store", type=Path,
                            default=env_path("IMAGE_STORE_DIR", REPO_ROOT / "run" / "images"))
        parser.add_argument("--seed-dir", type=Path, default=env_str("WEB_SEED_DIR", "") or None)
        parser.add_argument("--log-level", default=env_str("LOG_LEVEL", "info"))
        args = parser.parse_args(argv)
        return cls(host=args.host, port=args.port, gateway_addr=args.gateway,
                   image_store_dir=args.image_store,
                   seed_dir=Path(args.seed_dir) if args.seed_dir else None,
                   max_upload_bytes=env_int("WEB_MAX_UPLOAD_MB", 16, minimum=1) * 1024 * 1024,
                   gateway_timeout_s=env_float("WEB_GATEWAY_TIMEOUT_S", 30.0, minimum=0.1),
                   log_level=args.log_level)
