"""TLS and mutual TLS on every service, from certificate files named in the environment
(`common.security`): a throwaway CA, server and client certificates made with the ``openssl``
command line for each test session, servers started in-process on loopback.

For each server: TLS only -> a plaintext client fails and a TLS client that trusts the CA works;
mutual TLS -> a TLS client without a certificate fails, one with a certificate from another CA
fails, one with the CA's client certificate works. And the gateway reaches an mTLS indexer over
its own TLS channel, with the write token, end to end.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from common.config import ConfigError
from common.security import open_channel
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc
from scripts.stack import free_port
from services.gateway.config import GatewayConfig, RetryPolicy
from services.gateway.domain import Listing
from services.gateway.server import start as start_gateway
from services.indexer.config import IndexerConfig
from services.indexer.server import start as start_indexer
from services.indexer.spec import parse_collections

pytestmark = pytest.mark.timeout(180)
TLS_VARS = (
    "TLS_CERT",
    "TLS_KEY",
    "TLS_CLIENT_CA",
    "TLS_CA",
    "TLS_CLIENT_CERT",
    "TLS_CLIENT_KEY",
    "WRITE_TOKEN",
)
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        *EC,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca (trusted), server (127.0.0.1 / localhost), client (signed by ca), rogue-ca and
    rogue-client (signed by rogue-ca)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    _leaf(
        directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _leaf(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(directory, "rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return SimpleNamespace(
        dir=directory,
        **{
            name.replace("-", "_"): directory / f"{name}.pem"
            for name in ("ca", "rogue-ca", "server", "client", "rogue-client")
        },
        key=lambda name: directory / f"{name}.key",
    )


@pytest.fixture
def clean_env(monkeypatch):
    for name in TLS_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _server_env(env, pki, mutual: bool) -> None:
    env.setenv("TLS_CERT", str(pki.server))
    env.setenv("TLS_KEY", str(pki.key("server")))
    if mutual:
        env.setenv("TLS_CLIENT_CA", str(pki.ca))
    else:
        env.delenv("TLS_CLIENT_CA", raising=False)


def _channel(port: int, pki, *, tls: bool, ca: Path | None = None, client: str | None = None):
    target = f"127.0.0.1:{port}"
    if not tls:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=pki.key(client).read_bytes() if client else None,
        certificate_chain=(pki.dir / f"{client}.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(target, credentials)


def _answers(port: int, pki, ask, **channel_kwargs) -> grpc.StatusCode:
    """The status of one application call over the described channel (OK / NOT_FOUND = the server
    answered; UNAVAILABLE = no connection, e.g. the handshake failed)."""
    with _channel(port, pki, **channel_kwargs) as channel:
        try:
            ask(channel)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


def _start_indexer(root: Path):
    return start_indexer(
        IndexerConfig.local(
            host="127.0.0.1",
            port=0,
            data_dir=root,
            log_level="warning",
            collections=tuple(parse_collections("image:4:flat:ip")),
            collections_explicit=True,
            fsync=False,
        )
    )


def _gateway_config(root: Path, indexer_port: int, token: str | None = None) -> GatewayConfig:
    return GatewayConfig.local(
        host="127.0.0.1",
        port=0,
        db_path=root / "catalogue.sqlite3",
        embedder_addr=f"127.0.0.1:{free_port()}",  # nothing there: not needed
        indexer_addrs=(f"127.0.0.1:{indexer_port}",),
        downstream_timeout_s=10,
        retry=RetryPolicy(2, 0.05, 0.2),
        write_token=token,
    )


def _ask_indexer(channel):
    indexer_pb2_grpc.IndexerStub(channel).GetStats(indexer_pb2.GetStatsRequest(), timeout=5)


def _ask_gateway(channel):
    try:
        gateway_pb2_grpc.GatewayStub(channel).GetListing(
            gateway_pb2.GetListingRequest(listing_id="no-such"), timeout=5
        )
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: the gateway itself answered
            raise


def _check_transport(port: int, pki, ask, mutual: bool) -> None:
    C = grpc.StatusCode
    assert _answers(port, pki, ask, tls=False) == C.UNAVAILABLE  # plaintext to a TLS port
    assert _answers(port, pki, ask, tls=True, ca=pki.rogue_ca) == C.UNAVAILABLE  # untrusted server
    if mutual:
        assert _answers(port, pki, ask, tls=True) == C.UNAVAILABLE  # no client certificate
        assert _answers(port, pki, ask, tls=True, client="rogue-client") == C.UNAVAILABLE
        assert _answers(port, pki, ask, tls=True, client="client") == C.OK
    else:
        assert _answers(port, pki, ask, tls=True) == C.OK
        assert _answers(port, pki, ask, tls=True, client="client") == C.OK


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_indexer_tls(pki, clean_env, tmp_path, mutual):
    _server_env(clean_env, pki, mutual)
    server = _start_indexer(tmp_path / "indexer")
    try:
        _check_transport(server.port, pki, _ask_indexer, mutual)
    finally:
        server.stop(0)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_gateway_tls(pki, clean_env, tmp_path, mutual):
    _server_env(clean_env, pki, mutual)
    server = start_gateway(_gateway_config(tmp_path, free_port()))
    try:
        _check_transport(server.port, pki, _ask_gateway, mutual)
    finally:
        server.stop(0)


def test_embedder_mtls(pki, clean_env, test_artifact):
    from services.embedder.config import EmbedderConfig
    from services.embedder.server import start as start_embedder

    _server_env(clean_env, pki, mutual=True)
    server = start_embedder(
        EmbedderConfig.local(
            artifact_dir=test_artifact,
            host="127.0.0.1",
            port=0,
            torch_threads=1,
            decode_threads=1,
            text_model="off",
        )
    )
    try:
        _check_transport(
            server.port,
            pki,
            lambda channel: embedder_pb2_grpc.EmbedderStub(channel).GetModelInfo(
                embedder_pb2.GetModelInfoRequest(), timeout=5
            ),
            mutual=True,
        )
    finally:
        server.stop(0)


def test_gateway_to_indexer_over_mutual_tls_with_the_write_token(pki, clean_env, tmp_path):
    """Every hop is mutual TLS: the test client -> gateway, and the gateway's own channel ->
    indexer (TLS_CA + TLS_CLIENT_CERT/KEY), and writes carry the token all the way."""
    token = "tls-test-token"
    _server_env(clean_env, pki, mutual=True)
    clean_env.setenv("TLS_CA", str(pki.ca))
    clean_env.setenv("TLS_CLIENT_CERT", str(pki.client))
    clean_env.setenv("TLS_CLIENT_KEY", str(pki.key("client")))
    clean_env.setenv("WRITE_TOKEN", token)
    indexer = _start_indexer(tmp_path / "indexer")
    gateway = None
    try:
        gateway = start_gateway(_gateway_config(tmp_path, indexer.port, token))
        vectors = np.eye(4, dtype=np.float32)
        for n in range(2):  # two listings, one photo each: catalogue + vectors on the shard
            gateway.core.catalogue.add(Listing(f"tls-{n}", f"listing {n}", image_ids=(f"img-{n}",)))
        with _channel(indexer.port, pki, tls=True, client="client") as channel:
            indexer_pb2_grpc.IndexerStub(channel).Upsert(
                indexer_pb2.UpsertRequest(
                    collection="image",
                    items=[
                        indexer_pb2.Item(
                            id=f"img-{n}",
                            vector=(vectors[0] + 0.1 * vectors[n + 1]).tolist(),
                            attributes=indexer_pb2.Attributes(listing_id=f"tls-{n}"),
                        )
                        for n in range(2)
                    ],
                ),
                timeout=10,
                metadata=[("authorization", f"Bearer {token}")],
            )
        with _channel(gateway.port, pki, tls=True, client="client") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            similar = stub.SimilarListings(
                gateway_pb2.SimilarListingsRequest(listing_id="tls-0", k=3), timeout=10
            )  # the gateway fetched from the indexer
            assert [r.listing.id for r in similar.results] == ["tls-1"]
            removed = stub.RemoveListing(
                gateway_pb2.RemoveListingRequest(listing_id="tls-1"),
                timeout=10,
                metadata=[("authorization", f"Bearer {token}")],
            )
            assert removed.images_removed == 1  # the gateway's Delete reached the indexer
        with _channel(indexer.port, pki, tls=True, client="client") as channel:
            fetched = indexer_pb2_grpc.IndexerStub(channel).Fetch(
                indexer_pb2.FetchRequest(collection="image", ids=["img-0", "img-1"]), timeout=10
            )
        assert list(fetched.not_found) == ["img-1"]
    finally:
        if gateway is not None:
            gateway.stop(0)
        indexer.stop(0)


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(TLS_CERT="server", TLS_KEY="client"), "the key does not belong to the certificate"),
        (dict(TLS_CERT="not-pem", TLS_KEY="server"), "expected a PEM certificate (chain)"),
        (
            dict(TLS_CERT="server", TLS_KEY="server", TLS_CLIENT_CA="not-pem"),
            "TLS_CLIENT_CA=.*: expected PEM CA certificate",
        ),
    ],
)
def test_wrong_tls_files_are_named_before_binding(pki, clean_env, tmp_path, setting, message):
    """gRPC alone says only "Failed to bind to address" for a bad certificate or key."""
    (pki.dir / "not-pem.pem").write_text("hello\n")
    for name, which in setting.items():
        clean_env.setenv(name, str(pki.key(which) if name == "TLS_KEY" else pki.dir / f"{which}.pem"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _start_indexer(tmp_path / "index")


def test_wrong_client_tls_files_are_named(pki, clean_env, tmp_path):
    clean_env.setenv("TLS_CA", str(pki.key("ca")))  # a key, not a certificate
    with pytest.raises(ConfigError, match="TLS_CA=.*: expected PEM CA certificate"):
        open_channel("127.0.0.1:1")
    clean_env.setenv("TLS_CA", str(pki.ca))
    clean_env.setenv("TLS_CLIENT_CERT", str(pki.client))
    with pytest.raises(ConfigError, match="needs both TLS_CLIENT_CERT and TLS_CLIENT_KEY"):
        open_channel("127.0.0.1:1")
    clean_env.setenv("TLS_CLIENT_KEY", str(pki.key("rogue-client")))
    with pytest.raises(ConfigError, match="the key does not belong to the certificate"):
        open_channel("127.0.0.1:1")
    clean_env.setenv("TLS_CLIENT_KEY", str(pki.key("client")))
    open_channel("127.0.0.1:1").close()
