"""``python -m services.web``: the HTTP edge under uvicorn."""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

from common.image_store import fill_from_prepared, open_image_store
from common.logs import setup_logging
from services.web.app import create_app
from services.web.config import WebConfig

log = logging.getLogger(__name__)


def bootstrap_photos(config: WebConfig) -> None:
    """Add the prepared photos missing from the store (in the background: the page serves
    meanwhile, and photos appear as they land)."""
    if config.bootstrap_dir is None:
        return

    def fill() -> None:
        try:
            report = fill_from_prepared(open_image_store(config.image_store_dir), config.bootstrap_dir)
        except OSError as exc:
            log.error("photos of %s not added to the store: %s", config.bootstrap_dir, exc)
            return
        log.info(
            "image store %s: %d prepared photos added, %d already there, %d skipped",
            config.image_store_dir,
            report.added,
            report.already_there,
            report.skipped,
        )

    threading.Thread(target=fill, name="bootstrap-photos", daemon=True).start()


def _stopped(_signum, _frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    config = WebConfig.from_env(argv)
    setup_logging("web", config.log_level)
    bootstrap_photos(config)
    app = create_app(config)
    log.info(
        "web edge for gateway %s on http://%s:%d/ (photos from %s)",
        config.gateway_addr,
        config.host,
        config.port,
        config.image_store_dir,
    )
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again with the handler
    # it found: this one, so a stop on request exits 0 like the other services.
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        access_log=config.log_level.lower() == "debug",
        timeout_graceful_shutdown=5,
    )
