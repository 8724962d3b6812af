"""`make up` / `make down` (scripts.stack) for real: processes on ports, the first `up` fills an
empty catalogue and index from prepared data, `down` stops exactly what `up` started."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scripts import stack
from services.gateway.client import GatewayClient
from tests.support.photos import NoPhotos, real_photos

pytestmark = pytest.mark.timeout(300)
SERVICES_ORDER = list(stack.SERVICES)
CATEGORIES = ("Home & Garden", "Video Games & Consoles", "Sports, Leisure & Travel")


def edge_get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def test_up_without_a_model_artefact_says_how_to_get_one(tmp_path, capsys):
    code = stack.main(
        ["up", "--run-dir", str(tmp_path / "run"), "--artifact-dir", str(tmp_path / "no-model")]
    )
    assert code == 2
    assert "make demo" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.pid"))


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A prepared-data folder of three listings, one real photo each."""
    try:
        photos = real_photos(3)
    except NoPhotos as exc:
        pytest.skip(f"no real photos: {exc}")
    folder = tmp_path / "prepared"
    (folder / "images").mkdir(parents=True)
    with (
        open(folder / "listings.csv", "w", newline="") as listings,
        open(folder / "images.csv", "w", newline="") as images,
    ):
        lw, iw = csv.writer(listings), csv.writer(images)
        lw.writerow(["product_id", "title", "description", "main_category", "price", "location"])
        iw.writerow(["image_id", "product_id", "path"])
        for i, (data, category) in enumerate(zip(photos, CATEGORIES)):
            lw.writerow([f"listing-{i}", f"Listing {i}", "", category, "10", "Leeds"])
            iw.writerow([f"photo-{i}", f"listing-{i}", f"images/photo-{i}.jpg"])
            (folder / "images" / f"photo-{i}.jpg").write_bytes(data)
    return folder


def test_up_fills_an_empty_stack_and_down_stops_it(tmp_path, prepared, test_artifact, monkeypatch, capsys):
    ports = {name: stack.free_port() for name in stack.SERVICES}
    for name, port in ports.items():
        monkeypatch.setenv(f"{name.upper()}_PORT", str(port))
    monkeypatch.setenv("EMBEDDER_TEXT_MODEL", "off")  # images only: a faster start
    monkeypatch.delenv("WRITE_TOKEN", raising=False)
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--artifact-dir", str(test_artifact), "--prepared", str(prepared)]
    try:
        assert stack.main(["up", *args]) == 0
        out = capsys.readouterr().out
        assert "loaded 3 listings and 3 photos" in out
        assert "indexed 3 vectors" in out  # through the running embedder: no embeddings/
        assert "image store" in out and "3 prepared photos added" in out
        page = f"http://127.0.0.1:{ports['web']}/"
        assert f"page: {page}" in out
        with urllib.request.urlopen(page, timeout=30) as reply:
            assert b"Marketplace visual search" in reply.read()
        with urllib.request.urlopen(f"{page}api/images/photo-1", timeout=30) as reply:
            assert reply.headers["Content-Type"] == "image/jpeg"
            assert reply.read() == (prepared / "images" / "photo-1.jpg").read_bytes()
        with GatewayClient(f"127.0.0.1:{ports['gateway']}", timeout=60) as gateway:
            top = gateway.search_by_image(prepared / "images" / "photo-1.jpg", k=3)
        assert top[0].listing.id == "listing-1" and top[0].score > 0.99
        assert stack.main(["status"]) == 0
        status = capsys.readouterr().out.splitlines()
        assert [line.split()[:3] for line in status] == [
            [name, f"127.0.0.1:{ports[name]}", "SERVING"] for name in stack.SERVICES
        ]
        gateway_line = status[SERVICES_ORDER.index("gateway")]
        assert gateway_line.endswith("(ready: SERVING)")  # the gateway's downstreams serve
        pids = {name: int((run_dir / f"{name}.pid").read_text()) for name in stack.SERVICES}
    finally:
        stack.main(["down", *args])
    out = capsys.readouterr().out
    assert all(f"stopped {name} (pid {pid})" in out for name, pid in pids.items())
    assert not list(run_dir.glob("*.pid"))
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_up_with_postgres_runs_two_gateways_on_one_catalogue(prepared, test_artifact, monkeypatch, capsys):
    """`make up DB=postgres`: a real PostgreSQL in the run directory and two gateway replicas on
    it; a listing added through one is served by the other; `down` stops all, PostgreSQL too."""
    import shutil
    import tempfile

    ports = {name: stack.free_port() for name in stack.SERVICES}
    for name, port in ports.items():
        monkeypatch.setenv(f"{name.upper()}_PORT", str(port))
    second, pg_port = stack.free_port(), stack.free_port()
    monkeypatch.setenv("GATEWAY2_PORT", str(second))
    monkeypatch.setenv("POSTGRES_PORT", str(pg_port))
    monkeypatch.setenv("EMBEDDER_TEXT_MODEL", "off")
    monkeypatch.delenv("WRITE_TOKEN", raising=False)
    root = Path(tempfile.mkdtemp(prefix="stack-pg-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user and must reach run/postgres
    run_dir = root / "run"
    args = ["--run-dir", str(run_dir), "--artifact-dir", str(test_artifact), "--prepared", str(prepared)]
    try:
        assert stack.main(["up", "--db", "postgres", *args]) == 0
        out = capsys.readouterr().out
        assert f"postgres  127.0.0.1:{pg_port}" in out and "loaded 3 listings and 3 photos" in out
        first = GatewayClient(f"127.0.0.1:{ports['gateway']}", timeout=60)
        other = GatewayClient(f"127.0.0.1:{second}", timeout=60)
        with first, other:
            assert (
                other.search_by_image(prepared / "images" / "photo-1.jpg", k=1)[0].listing.id == "listing-1"
            )
            added = first.add(
                [prepared / "images" / "photo-2.jpg"], title="Another", main_category=CATEGORIES[2]
            )
            assert other.get(added.id) == added
        assert stack.main(["status", "--run-dir", str(run_dir)]) == 0
        status = capsys.readouterr().out
        assert f"gateway-2 127.0.0.1:{second}" in status and "postgres" in status and "RUNNING" in status

        # the edge was given both replicas: with the first one dead it keeps serving
        listing_url = f"http://127.0.0.1:{ports['web']}/api/listings/{added.id}"
        assert edge_get_json(listing_url)["id"] == added.id
        os.kill(int((run_dir / "gateway.pid").read_text()), signal.SIGKILL)
        served = 0
        deadline = time.monotonic() + 30
        while served < 10 and time.monotonic() < deadline:  # a call already on its way may fail
            try:
                assert edge_get_json(listing_url)["id"] == added.id
                served += 1
            except urllib.error.HTTPError as error:
                assert error.code == 503, error.read()
                served = 0
                time.sleep(0.2)
        assert served == 10, "the edge stopped serving when the first gateway died"
    finally:
        stack.main(["down", *args])
    out = capsys.readouterr().out
    assert "stopped gateway-2" in out and "stopped postgres" in out and "stopped web" in out
    assert not list(run_dir.glob("*.pid"))
    shutil.rmtree(root, ignore_errors=True)
