"""The reliability suite: bad input, bounded load and faults against the real stack.

One module used at two sizes: by ``tests/reliability/test_*.py`` (small, in the default test run)
and by ``python -m benchmarks.reliability`` (larger). Everything runs on loopback only
(127.0.0.1), every loop is bounded by a request count and a time limit, and every service is a
real subprocess started with `scripts.stack.spawn` on a fixed ephemeral port, so a killed
service comes back on the same address.

    stack = Stack.start(root, artifact)          # embedder, N indexer shards, gateway
    fuzz = run_fuzz(stack)                       # -> FuzzStats  (bad_inputs, imprecise, ...)
    load = run_load(stack, requests=200, concurrency=16)   # -> LoadStats (sent, failed, RSS)
    faults = run_faults(stack)                   # -> FaultStats (acked_writes, lost_writes, ...)
    stack.close()

Figures every caller prints: requests sent, failed, bad inputs tried, acknowledged writes lost.
"""

from __future__ import annotations

import io
import json
import random
import secrets
import signal
import subprocess
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import grpc
import numpy as np
import psutil
from PIL import Image

from marketplace.embedder.v1 import embedder_pb2
from marketplace.gateway.v1 import gateway_pb2
from marketplace.indexer.v1 import indexer_pb2
from scripts.stack import ServiceProcess, free_port, spawn, wait_ready
from services.gateway.shards import shard_of

LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024
GATEWAY = "marketplace.gateway.v1.Gateway"
EMBEDDER = "marketplace.embedder.v1.Embedder"
INDEXER = "marketplace.indexer.v1.Indexer"
AUTH = "authorization"
CODE = grpc.StatusCode
OK = CODE.OK
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 512 * MiB),
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def _identity(data: bytes) -> bytes:
    return data


# ============================================================================ photos


def load_photos(count: int) -> list[bytes]:
    """``count`` real marketplace photos (JPEG bytes) when the shared data is there; otherwise
    synthetic but valid JPEGs (noise over a gradient), so the suite runs anywhere."""
    from tests.support.photos import photo_files

    files = photo_files(count)
    photos = [path.read_bytes() for path in files]
    rng = np.random.default_rng(7)
    while len(photos) < count:
        base = np.linspace(0, 255, 256, dtype=np.float32)[None, :, None]
        pixels = np.clip(base + rng.normal(0, 40, (256, 256, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


# ============================================================================ the stack


@dataclass
class Stack:
    """The three services as subprocesses on loopback, with one channel to each.

    Service keys: ``embedder``, ``indexer-0`` .. ``indexer-{N-1}``, ``gateway``. Every service
    logs JSON at ``log_level`` to ``root/logs/<key>.log``; writes need ``token``.
    """

    root: Path
    artifact: Path
    token: str
    shards: int
    ports: dict[str, int]
    envs: dict[str, dict[str, str]]
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    photos: list[bytes] = field(default_factory=list)
    bootstrapped: list["Write"] = field(default_factory=list)
    ledger: "Ledger" = field(default_factory=lambda: Ledger())
    start_timeout_s: float = 180.0
    _text_served: bool | None = None

    # ------------------------------------------------------------------ start / stop

    @classmethod
    def start(
        cls,
        root: Path,
        artifact: Path,
        *,
        shards: int = 2,
        log_level: str = "debug",
        photos: int = 24,
        bootstrap_listings: int = 8,
        torch_threads: int = 1,
        text_model: str = "auto",
        extra_env: dict[str, str] | None = None,
    ) -> "Stack":
        """Start embedder, ``shards`` indexers and the gateway; add ``bootstrap_listings`` listings
        (one photo each) through the gateway. Stops whatever started if anything fails.
        ``text_model`` is EMBEDDER_TEXT_MODEL: "off" saves several seconds per embedder start
        (the text RPCs then answer FAILED_PRECONDITION, AddListing stores no text vector)."""
        root.mkdir(parents=True, exist_ok=True)
        keys = ["embedder", *[f"indexer-{i}" for i in range(shards)], "gateway"]
        ports = {key: free_port() for key in keys}
        token = "rel-" + secrets.token_urlsafe(24)
        common = {
            "LOG_LEVEL": log_level,
            "WRITE_TOKEN": token,
            "TLS_CERT": "",
            "TLS_KEY": "",
            "TLS_CLIENT_CA": "",
            "TLS_CA": "",
            "TLS_CLIENT_CERT": "",
            "TLS_CLIENT_KEY": "",
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        envs = {
            "embedder": {
                **common,
                "EMBEDDER_ARTIFACT_DIR": str(artifact),
                "EMBEDDER_TORCH_THREADS": str(torch_threads),
                "EMBEDDER_DECODE_THREADS": "2",
                "EMBEDDER_BATCH_SIZE": "8",
                "EMBEDDER_MAX_WAIT_MS": "5",
                "EMBEDDER_TEXT_MODEL": text_model,
            }
        }
        for i in range(shards):
            envs[f"indexer-{i}"] = {
                **common,
                "INDEXER_DATA_DIR": str(root / f"indexer-{i}"),
                "INDEXER_COLLECTIONS": "",  # the default: image + text
                "INDEXER_FSYNC": "true",
                "INDEXER_FAISS_THREADS": "1",
            }
        envs["gateway"] = {
            **common,
            "GATEWAY_DB": str(root / "catalogue.sqlite3"),
            "EMBEDDER_ADDR": f"{LOOPBACK}:{ports['embedder']}",
            "INDEXER_ADDRS": ",".join(f"{LOOPBACK}:{ports[f'indexer-{i}']}" for i in range(shards)),
            "GATEWAY_RECONNECT_BACKOFF_MAX_S": "0.5",
            "GATEWAY_DOWNSTREAM_TIMEOUT_S": "20",
        }
        stack = cls(root, artifact, token, shards, ports, envs, photos=load_photos(photos))
        try:
            for key in keys:
                stack.spawn(key)
            for key in keys:
                stack.wait(key)
            for key in keys:
                stack.channels[key] = grpc.insecure_channel(stack.address(key), CHANNEL_OPTIONS)
            stack.bootstrap(bootstrap_listings)
        except BaseException:
            stack.close()
            raise
        return stack

    def close(self) -> dict[str, int]:
        """SIGTERM every service (gateway first); returns their exit codes."""
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        keys = list(reversed(list(self.procs)))
        for key in keys:  # SIGTERM all at once (gateway first), then wait for each
            if self.procs[key].process.poll() is None:
                self.procs[key].process.send_signal(signal.SIGTERM)
        codes = {}
        for key in keys:  # one SIGTERM only: a second one during interpreter exit would kill it
            process = self.procs[key].process
            try:
                codes[key] = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[key] = process.wait()
        return codes

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ processes

    @property
    def keys(self) -> list[str]:
        return list(self.ports)

    @property
    def indexer_keys(self) -> list[str]:
        return [key for key in self.ports if key.startswith("indexer-")]

    def address(self, key: str) -> str:
        return f"{LOOPBACK}:{self.ports[key]}"

    def log_path(self, key: str) -> Path:
        return self.root / "logs" / f"{key}.log"

    def spawn(self, key: str) -> ServiceProcess:
        module = key.split("-")[0]
        self.procs[key] = spawn(module, self.ports[key], self.log_path(key), self.envs[key])
        return self.procs[key]

    def wait(self, key: str, timeout: float | None = None) -> None:
        proc = self.procs[key]
        wait_ready(proc, timeout or self.start_timeout_s)

    def kill(self, key: str) -> None:
        """SIGKILL: no goodbye, no final snapshot."""
        self.procs[key].kill()

    def restart(self, key: str) -> float:
        """Start ``key`` again on its port and wait until SERVING; returns the seconds it took."""
        started = time.monotonic()
        self.spawn(key)
        self.wait(key)
        return time.monotonic() - started

    def pid(self, key: str) -> int:
        return self.procs[key].process.pid

    def rss(self) -> dict[str, int]:
        """Resident memory of each service process, in bytes (0 if it is not running)."""
        result = {}
        for key, proc in self.procs.items():
            try:
                result[key] = psutil.Process(proc.process.pid).memory_info().rss
            except psutil.Error:
                result[key] = 0
        return result

    # ------------------------------------------------------------------ calls

    def call(
        self,
        key: str,
        service: str,
        method: str,
        request,
        *,
        timeout: float = 30.0,
        metadata: Iterable[tuple[str, str]] = (),
        write: bool = False,
    ):
        """One unary call with ``request`` a message or raw bytes; returns (code, details,
        response bytes). Never raises for a status."""
        data = request if isinstance(request, (bytes, bytearray)) else request.SerializeToString()
        rpc = self.channels[key].unary_unary(
            f"/{service}/{method}", request_serializer=_identity, response_deserializer=_identity
        )
        meta = list(metadata) + ([(AUTH, f"Bearer {self.token}")] if write else [])
        try:
            reply = rpc(bytes(data), timeout=timeout, metadata=meta or None)
            return OK, "", reply
        except grpc.RpcError as error:
            return error.code(), error.details() or "", b""

    def gateway(self, method: str, request, **kwargs):
        return self.call("gateway", GATEWAY, method, request, **kwargs)

    def embedder(self, method: str, request, **kwargs):
        return self.call("embedder", EMBEDDER, method, request, **kwargs)

    def indexer(self, shard: int, method: str, request, **kwargs):
        return self.call(f"indexer-{shard}", INDEXER, method, request, **kwargs)

    # ------------------------------------------------------------------ data

    def add_listing(
        self,
        listing_id: str,
        photos: list[bytes],
        *,
        timeout: float = 30.0,
        title: str = "reliability listing",
        price: float = 10.0,
    ):
        request = gateway_pb2.AddListingRequest(
            listing=gateway_pb2.Listing(
                id=listing_id,
                title=title,
                price=price,
                location="Leeds, West Yorkshire",
                description="added by the reliability suite",
            ),
            images=photos,
        )
        code, details, reply = self.gateway("AddListing", request, timeout=timeout, write=True)
        image_ids: tuple[str, ...] = ()
        if code == OK:
            image_ids = tuple(gateway_pb2.AddListingResponse.FromString(reply).listing.image_ids)
        return code, details, image_ids

    def bootstrap(self, count: int) -> None:
        for n in range(count):
            listing_id = f"seed-{n:04d}"
            code, details, image_ids = self.add_listing(
                listing_id, [self.photos[n % len(self.photos)]], timeout=120
            )
            if code != OK:
                raise RuntimeError(f"bootstrapping {listing_id} failed: {code.name}: {details}")
            write = Write(listing_id, image_ids, shard_of(listing_id, self.shards))
            self.bootstrapped.append(write)
            self.ledger.acknowledge(write)

    def listing_id_on_shard(self, shard: int, prefix: str) -> str:
        """A fresh listing id that the gateway places on ``shard``."""
        while True:
            candidate = f"{prefix}-{secrets.token_hex(4)}"
            if shard_of(candidate, self.shards) == shard:
                return candidate

    @property
    def text_served(self) -> bool:
        """Whether the embedder serves EmbedText (GetModelInfo.modalities; asked once)."""
        if self._text_served is None:
            code, details, reply = self.embedder("GetModelInfo", embedder_pb2.GetModelInfoRequest())
            if code != OK:
                raise RuntimeError(f"GetModelInfo failed: {code.name}: {details}")
            self._text_served = "text" in embedder_pb2.ModelInfo.FromString(reply).modalities
        return self._text_served

    def good_vector(self) -> list[float]:
        rng = np.random.default_rng(3)
        vector = rng.normal(size=1280).astype(np.float32)
        return (vector / np.linalg.norm(vector)).tolist()


# ============================================================================ writes ledger


@dataclass(frozen=True)
class Write:
    """An AddListing the gateway acknowledged: listing id, its photo ids, its shard."""

    listing_id: str
    image_ids: tuple[str, ...]
    shard: int


class Ledger:
    """Acknowledged writes (adds, and removes of them), and writes whose outcome is unknown."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.added: dict[str, Write] = {}
        self.removed: dict[str, Write] = {}
        self.uncertain: set[str] = set()
        self.acked = 0

    def acknowledge(self, write: Write) -> None:
        with self.lock:
            self.added[write.listing_id] = write
            self.acked += 1

    def take_for_removal(self, rng: random.Random, keep: Iterable[str] = ()) -> Write | None:
        with self.lock:
            candidates = sorted(set(self.added) - set(keep) - self.uncertain)
            if not candidates:
                return None
            listing_id = rng.choice(candidates)
            self.uncertain.add(listing_id)  # until the remove's outcome is known
            return self.added[listing_id]

    def removal_done(self, write: Write, acknowledged: bool) -> None:
        with self.lock:
            if acknowledged:
                self.added.pop(write.listing_id, None)
                self.removed[write.listing_id] = write
                self.uncertain.discard(write.listing_id)
                self.acked += 1
            # not acknowledged: stays uncertain (it may or may not be half-removed)

    def mark_uncertain(self, listing_id: str) -> None:
        with self.lock:
            self.uncertain.add(listing_id)

    def still_added(self, listing_id: str) -> bool:
        """The acknowledged add is still in effect: no remove of it has been sent since (the load
        may remove a listing while `verify_writes` is checking it)."""
        with self.lock:
            return listing_id in self.added and listing_id not in self.uncertain


def verify_writes(
    stack: Stack, ledger: Ledger, *, timeout: float = 30.0, settle_s: float = 10.0
) -> list[str]:
    """Every acknowledged write still in effect: an added listing is in the catalogue with the same
    photos and every photo vector is on its shard; a removed one is gone from both. Returns one
    line per lost write (empty list: nothing lost)."""
    lost: list[str] = []
    with ledger.lock:
        added = [w for lid, w in ledger.added.items() if lid not in ledger.uncertain]
        removed = list(ledger.removed.values())
    by_shard: dict[int, list[Write]] = {}
    for write in added:
        code, details, reply = stack.gateway(
            "GetListing", gateway_pb2.GetListingRequest(listing_id=write.listing_id), timeout=timeout
        )
        if code != OK:
            if ledger.still_added(write.listing_id):
                lost.append(f"{write.listing_id}: GetListing {code.name}: {details}")
            continue
        got = tuple(gateway_pb2.Listing.FromString(reply).image_ids)
        if got != write.image_ids and ledger.still_added(write.listing_id):
            lost.append(f"{write.listing_id}: catalogue photos {got} != acknowledged {write.image_ids}")
        by_shard.setdefault(write.shard, []).append(write)
    collections = {"image": lambda write: write.image_ids}
    if stack.text_served:  # AddListing also stores one text vector per listing (id = listing id)
        collections["text"] = lambda write: (write.listing_id,)
    for shard, writes in by_shard.items():
        for collection, ids_of in collections.items():
            ids = [item_id for write in writes for item_id in ids_of(write)]
            listing_of = {item_id: write.listing_id for write in writes for item_id in ids_of(write)}
            for start in range(0, len(ids), 512):
                chunk = ids[start : start + 512]
                code, details, reply = stack.indexer(
                    shard,
                    "Fetch",
                    indexer_pb2.FetchRequest(collection=collection, ids=chunk),
                    timeout=timeout,
                )
                if code != OK:
                    lost.append(f"shard {shard}: Fetch {collection} {code.name}: {details}")
                    continue
                missing = set(indexer_pb2.FetchResponse.FromString(reply).not_found)
                lost += [
                    f"{item_id}: {collection} vector missing on shard {shard}"
                    for item_id in chunk
                    if item_id in missing and ledger.still_added(listing_of[item_id])
                ]
    for write in removed:
        code, _, _ = stack.gateway(
            "GetListing", gateway_pb2.GetListingRequest(listing_id=write.listing_id), timeout=timeout
        )
        if code != CODE.NOT_FOUND:
            lost.append(f"{write.listing_id}: removed but GetListing answers {code.name}")
        for collection, ids in (("image", write.image_ids), ("text", (write.listing_id,))):
            if collection == "text" and not stack.text_served:
                continue
            code = _vectors_deleted(stack, write.shard, collection, list(ids), timeout, settle_s)
            if code is not None:
                lost.append(
                    f"{write.listing_id}: removed but {collection} Fetch on shard "
                    f"{write.shard} answers {code.name} with its vectors {settle_s:.0f} s "
                    f"later"
                )
    return lost


def _vectors_deleted(
    stack: Stack, shard: int, collection: str, ids: list[str], timeout: float, settle_s: float
):
    """None once the shard holds none of ``ids``; else the last Fetch's code after ``settle_s``.

    An acknowledged RemoveListing has deleted the listing and queued its vector deletion in the
    same transaction; the deletion reaches the shard at once when it answers in time, else by the
    outbox's retries (``pending`` in the reply), for example right after the shard restarted. So
    the vectors may outlive the acknowledgement by a retry delay, never for good."""
    until = time.monotonic() + settle_s
    while True:
        code, _, reply = stack.indexer(
            shard, "Fetch", indexer_pb2.FetchRequest(collection=collection, ids=ids), timeout=timeout
        )
        if code == OK and not indexer_pb2.FetchResponse.FromString(reply).items:
            return None
        if time.monotonic() >= until:
            return code
        time.sleep(0.2)


# ============================================================================ fuzz


@dataclass(frozen=True)
class Case:
    """One bad (or edge) input: where it goes, and the precise answer expected."""

    name: str
    target: str  # "gateway", "embedder", "indexer-0", ...
    method: str
    request: object  # a message or raw bytes
    expect: frozenset  # acceptable status codes (usually one)
    contains: tuple[str, ...] = ()  # substrings the details must contain (e.g. the limit)
    write: bool = False  # send the write token


def _case(name, target, method, request, *codes, contains=(), write=False) -> Case:
    return Case(name, target, method, request, frozenset(codes), tuple(contains), write)


@dataclass
class FuzzStats:
    bad_inputs: int = 0
    precise: int = 0
    imprecise: list[str] = field(default_factory=list)
    followups_ok: int = 0
    followups_failed: list[str] = field(default_factory=list)
    by_code: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def _unknown_field(number: int = 99, value: int = 1) -> bytes:
    """A protobuf varint field that no message of ours defines."""
    return _varint(number << 3) + _varint(value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fuzz_cases(
    stack: Stack, *, random_rounds: int = 3, seed: int = 11, huge_messages: bool = False
) -> list[Case]:
    """The bad inputs, per service and RPC. ``random_rounds`` random byte strings are sent as the
    whole request to every RPC; ``huge_messages`` adds a request over the embedder's receive limit
    (hundreds of MiB, only at the benchmark's size)."""
    rng = random.Random(seed)
    photo = stack.photos[0]
    truncated = photo[: len(photo) // 3]
    junk = bytes(rng.getrandbits(8) for _ in range(2048))
    over_image = b"\xff\xd8\xff\xe0" + b"\x00" * (8 * MiB)  # 8 MiB + 4: over the image limit
    bomb = png_bomb(8_000, 8_000)  # 64 Mpx: over the embedder's 40 Mpx limit
    giant = png_bomb(60_000, 60_000)  # 3.6 Gpx: Pillow's own bomb guard answers first
    known = stack.bootstrapped[0].listing_id
    E, G = "embedder", "gateway"
    IA, NF, RE, OKC = CODE.INVALID_ARGUMENT, CODE.NOT_FOUND, CODE.RESOURCE_EXHAUSTED, OK
    UNIMPL = CODE.UNIMPLEMENTED
    cases: list[Case] = []
    add = cases.append

    # -- embedder ------------------------------------------------------------------------------
    for method in ("Embed", "Classify"):
        make = (
            embedder_pb2.EmbedRequest
            if method == "Embed"
            else lambda **kw: embedder_pb2.ClassifyRequest(top_k=3, **kw)
        )
        add(_case(f"{method} empty batch", E, method, make(images=[]), IA, contains=("no images",)))
        add(_case(f"{method} random bytes", E, method, make(images=[junk]), IA, contains=("images[0]",)))
        add(_case(f"{method} empty image", E, method, make(images=[b""]), IA, contains=("empty",)))
        add(_case(f"{method} truncated JPEG", E, method, make(images=[truncated]), IA))
        add(
            _case(
                f"{method} oversized image", E, method, make(images=[over_image]), IA, contains=("8,388,608",)
            )
        )
        add(
            _case(
                f"{method} decompression bomb", E, method, make(images=[bomb]), IA, contains=("40,000,000",)
            )
        )
        add(
            _case(
                f"{method} 3.6 Gpx bomb",
                E,
                method,
                make(images=[giant]),
                IA,
                contains=("decompression bomb",),
            )
        )
        add(
            _case(
                f"{method} one bad among good",
                E,
                method,
                make(images=[photo, junk, photo]),
                IA,
                contains=("images[1]",),
            )
        )
        add(_case(f"{method} over max batch", E, method, make(images=[b"x"] * 33), IA, RE, contains=("32",)))
    add(
        _case(
            "Classify huge top_k",
            E,
            "Classify",
            embedder_pb2.ClassifyRequest(images=[photo], top_k=2**32 - 1),
            OKC,
        )
    )
    # EmbedText: the precise answer depends on whether this embedder serves text
    FP = CODE.FAILED_PRECONDITION
    texts = stack.text_served
    add(
        _case(
            "EmbedText empty batch",
            E,
            "EmbedText",
            embedder_pb2.EmbedTextRequest(),
            IA if texts else FP,
            contains=("no texts",) if texts else (),
        )
    )
    add(
        _case(
            "EmbedText empty text",
            E,
            "EmbedText",
            embedder_pb2.EmbedTextRequest(texts=["  "]),
            IA if texts else FP,
            contains=("texts[0]",) if texts else (),
        )
    )
    add(
        _case(
            "EmbedText 1 MB text",
            E,
            "EmbedText",
            embedder_pb2.EmbedTextRequest(texts=["oak table " * 100_000]),
            IA if texts else FP,
            contains=("2048",) if texts else (),
        )
    )
    add(
        _case(
            "EmbedText over max batch",
            E,
            "EmbedText",
            embedder_pb2.EmbedTextRequest(texts=["oak"] * 33),
            IA if texts else FP,
            contains=("32",) if texts else (),
        )
    )
    add(_case("EmbedText invalid UTF-8", E, "EmbedText", b"\x0a\x02\xff\xfe", IA, contains=("not a valid",)))
    add(
        _case(
            "Embed unknown field",
            E,
            "Embed",
            embedder_pb2.EmbedRequest(images=[photo]).SerializeToString() + _unknown_field(),
            OKC,
        )
    )
    if huge_messages:
        add(
            _case(
                "Embed request over the receive limit",
                E,
                "Embed",
                embedder_pb2.EmbedRequest(images=[b"\x00" * (4 * MiB)] * 65),
                RE,
                contains=("larger than max",),
            )
        )

    # -- indexer -------------------------------------------------------------------------------
    vector = stack.good_vector()
    item = lambda id_, values, **attrs: indexer_pb2.Item(  # noqa: E731
        id=id_, vector=values, attributes=indexer_pb2.Attributes(listing_id="fuzz", **attrs)
    )
    search = lambda **kw: indexer_pb2.SearchRequest(  # noqa: E731
        **{"collection": "image", "k": 3, "queries": [indexer_pb2.Vector(values=vector)], **kw}
    )
    for shard in range(stack.shards):
        I = f"indexer-{shard}"
        w = dict(write=True)
        add(
            _case(
                "Upsert wrong dimension",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(collection="image", items=[item("fuzz-a", vector[:100])]),
                IA,
                contains=("1280",),
                **w,
            )
        )
        add(
            _case(
                "Upsert NaN",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(
                    collection="image", items=[item("fuzz-a", [float("nan")] + vector[1:])]
                ),
                IA,
                **w,
            )
        )
        add(
            _case(
                "Upsert inf",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(
                    collection="image", items=[item("fuzz-a", [float("inf")] + vector[1:])]
                ),
                IA,
                **w,
            )
        )
        add(
            _case(
                "Upsert empty id",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(collection="image", items=[item("", vector)]),
                IA,
                **w,
            )
        )
        add(
            _case(
                "Upsert 10 KB id",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(collection="image", items=[item("x" * 10_000, vector)]),
                IA,
                contains=("256",),
                **w,
            )
        )
        add(
            _case(
                "Upsert ragged batch",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(
                    collection="image", items=[item("fuzz-a", vector), item("fuzz-b", vector[:7])]
                ),
                IA,
                **w,
            )
        )
        add(
            _case(
                "Upsert NaN price",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(
                    collection="image", items=[item("fuzz-a", vector, price=float("nan"))]
                ),
                IA,
                **w,
            )
        )
        add(
            _case(
                "Upsert empty batch", I, "Upsert", indexer_pb2.UpsertRequest(collection="image"), OKC, IA, **w
            )
        )
        add(
            _case(
                "Upsert over max batch",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(
                    collection="image", items=[item(f"f{i}", [0.0]) for i in range(1025)]
                ),
                RE,
                contains=("1024",),
                **w,
            )
        )
        add(
            _case(
                "Upsert unknown collection",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(collection="no-such", items=[item("fuzz-a", vector)]),
                NF,
                **w,
            )
        )
        add(
            _case(
                "Upsert over the message limit",
                I,
                "Upsert",
                indexer_pb2.UpsertRequest(collection="x" * (64 * MiB + 1)),
                RE,
                contains=("larger than max",),
                **w,
            )
        )
        add(
            _case(
                "Delete unknown id (strict)",
                I,
                "Delete",
                indexer_pb2.DeleteRequest(collection="image", ids=["no-such-id"], strict=True),
                NF,
                **w,
            )
        )
        add(
            _case(
                "Delete unknown id",
                I,
                "Delete",
                indexer_pb2.DeleteRequest(collection="image", ids=["no-such-id"]),
                OKC,
                **w,
            )
        )
        add(
            _case(
                "Delete empty batch", I, "Delete", indexer_pb2.DeleteRequest(collection="image"), OKC, IA, **w
            )
        )
        add(
            _case(
                "Delete over max batch",
                I,
                "Delete",
                indexer_pb2.DeleteRequest(collection="image", ids=[f"f{i}" for i in range(1025)]),
                RE,
                contains=("1024",),
                **w,
            )
        )
        add(_case("Search no queries", I, "Search", search(queries=[]), IA))
        add(_case("Search k=0", I, "Search", search(k=0), IA, contains=("1000",)))
        add(_case("Search huge k", I, "Search", search(k=2**32 - 1), IA, contains=("1000",)))
        add(
            _case(
                "Search wrong dimension",
                I,
                "Search",
                search(queries=[indexer_pb2.Vector(values=vector[:5])]),
                IA,
                contains=("1280",),
            )
        )
        add(
            _case(
                "Search NaN query",
                I,
                "Search",
                search(queries=[indexer_pb2.Vector(values=[float("nan")] * 1280)]),
                IA,
            )
        )
        add(
            _case(
                "Search inf query",
                I,
                "Search",
                search(queries=[indexer_pb2.Vector(values=[float("inf")] * 1280)]),
                IA,
            )
        )
        add(
            _case(
                "Search unknown filter field",
                I,
                "Search",
                search(filter=indexer_pb2.Filter(must=[indexer_pb2.Condition(field="colour", equals="red")])),
                IA,
                contains=("colour",),
            )
        )
        add(
            _case(
                "Search 100 KB filter field name",
                I,
                "Search",
                search(
                    filter=indexer_pb2.Filter(must=[indexer_pb2.Condition(field="c" * 100_000, equals="x")])
                ),
                IA,
                contains=("unknown filter field", "clipped"),
            )
        )
        add(
            _case(
                "Delete 100 KB unknown id (strict)",
                I,
                "Delete",
                indexer_pb2.DeleteRequest(collection="image", ids=["y" * 100_000], strict=True),
                NF,
                IA,
                write=True,
            )
        )
        add(
            _case(
                "Search filter without operator",
                I,
                "Search",
                search(filter=indexer_pb2.Filter(must=[indexer_pb2.Condition(field="category")])),
                IA,
            )
        )
        add(
            _case(
                "Search range on a string field",
                I,
                "Search",
                search(
                    filter=indexer_pb2.Filter(
                        must=[indexer_pb2.Condition(field="location", range=indexer_pb2.Range(gte=1))]
                    )
                ),
                IA,
            )
        )
        add(
            _case(
                "Search NaN range bound",
                I,
                "Search",
                search(
                    filter=indexer_pb2.Filter(
                        must=[indexer_pb2.Condition(field="price", range=indexer_pb2.Range(gte=float("nan")))]
                    )
                ),
                IA,
            )
        )
        add(
            _case(
                "Search huge ef_search",
                I,
                "Search",
                search(params=indexer_pb2.SearchParams(ef_search=2**32 - 1)),
                OKC,
                IA,
            )
        )
        add(_case("Search unknown collection", I, "Search", search(collection="no-such"), NF))
        add(
            _case(
                "Search over max batch",
                I,
                "Search",
                search(queries=[indexer_pb2.Vector(values=[0.0])] * 1025),
                RE,
                contains=("1024",),
            )
        )
        add(
            _case(
                "Fetch unknown ids",
                I,
                "Fetch",
                indexer_pb2.FetchRequest(collection="image", ids=["no-such-id"]),
                OKC,
            )
        )
        add(_case("Fetch empty batch", I, "Fetch", indexer_pb2.FetchRequest(collection="image"), OKC))
        add(
            _case(
                "Fetch over max batch",
                I,
                "Fetch",
                indexer_pb2.FetchRequest(collection="image", ids=[f"f{i}" for i in range(1025)]),
                RE,
                contains=("1024",),
            )
        )
        add(
            _case(
                "GetStats unknown collection",
                I,
                "GetStats",
                indexer_pb2.GetStatsRequest(collection="no-such"),
                NF,
                OKC,
            )
        )

    # -- gateway -------------------------------------------------------------------------------
    sbi = lambda **kw: gateway_pb2.SearchByImageRequest(**{"image": photo, "k": 3, **kw})  # noqa: E731
    lf = gateway_pb2.ListingFilter
    listing = lambda **kw: gateway_pb2.Listing(**{"title": "fuzz listing", **kw})  # noqa: E731
    addl = lambda images, **kw: gateway_pb2.AddListingRequest(  # noqa: E731
        listing=listing(**kw), images=images
    )
    for method, make in (
        ("ClassifyImage", lambda image: gateway_pb2.ClassifyImageRequest(image=image)),
        ("SearchByImage", lambda image: sbi(image=image)),
    ):
        add(_case(f"{method} random bytes", G, method, make(junk), IA))
        add(_case(f"{method} empty image", G, method, make(b""), IA, contains=("empty",)))
        add(_case(f"{method} truncated JPEG", G, method, make(truncated), IA))
        add(_case(f"{method} oversized image", G, method, make(over_image), IA, contains=("8,388,608",)))
        add(_case(f"{method} decompression bomb", G, method, make(bomb), IA, contains=("40,000,000",)))
        add(_case(f"{method} 3.6 Gpx bomb", G, method, make(giant), IA, contains=("decompression bomb",)))
        add(
            _case(
                f"{method} over the message limit",
                G,
                method,
                make(b"\x00" * (16 * MiB + 1)),
                RE,
                contains=("16777216",),
            )
        )
    add(
        _case(
            "ClassifyImage huge top_k",
            G,
            "ClassifyImage",
            gateway_pb2.ClassifyImageRequest(image=photo, top_k=2**32 - 1),
            OKC,
        )
    )
    add(_case("SearchByImage huge k", G, "SearchByImage", sbi(k=2**32 - 1), IA, contains=("100",)))
    add(_case("SearchByImage k over max", G, "SearchByImage", sbi(k=101), IA, contains=("100",)))
    add(
        _case(
            "SearchByImage NaN min_price",
            G,
            "SearchByImage",
            sbi(filter=lf(min_price=float("nan"))),
            IA,
            contains=("min_price",),
        )
    )
    add(
        _case(
            "SearchByImage inf max_price",
            G,
            "SearchByImage",
            sbi(filter=lf(max_price=float("inf"))),
            IA,
            contains=("max_price",),
        )
    )
    add(
        _case(
            "SearchByImage min_price > max_price",
            G,
            "SearchByImage",
            sbi(filter=lf(min_price=10, max_price=1)),
            IA,
        )
    )
    add(
        _case(
            "SearchByImage unknown category",
            G,
            "SearchByImage",
            sbi(filter=lf(main_category="Cars")),
            IA,
            contains=("Cars",),
        )
    )
    add(
        _case(
            "SearchByImage unknown filter field (ignored, proto3)",
            G,
            "SearchByImage",
            sbi().SerializeToString() + b"\x1a" + _varint(len(_unknown_field())) + _unknown_field(),
            OKC,
        )
    )
    add(
        _case(
            "SearchByImage excludes unknown ids",
            G,
            "SearchByImage",
            sbi(filter=lf(exclude_listing_ids=["no-such"] * 50)),
            OKC,
        )
    )
    text_req = gateway_pb2.SearchByTextRequest
    hybrid = gateway_pb2.HybridSearchRequest
    rec = gateway_pb2.RecommendRequest
    add(
        _case(
            "SearchByText empty query", G, "SearchByText", text_req(query=" ", k=3), IA, contains=("empty",)
        )
    )
    add(
        _case(
            "SearchByText 1 MB query",
            G,
            "SearchByText",
            text_req(query="oak " * 250_000),
            IA,
            contains=("2000",),
        )
    )
    add(
        _case(
            "SearchByText huge k",
            G,
            "SearchByText",
            text_req(query="oak table", k=2**32 - 1),
            IA,
            contains=("100",),
        )
    )
    add(
        _case(
            "SearchByText NaN max_price",
            G,
            "SearchByText",
            text_req(query="oak table", filter=lf(max_price=float("nan"))),
            IA,
        )
    )
    add(_case("Search neither image nor text", G, "Search", hybrid(k=3), IA))
    add(_case("Search random-bytes image", G, "Search", hybrid(image=junk, text="oak", k=3), IA))
    add(
        _case(
            "Search text_weight 2",
            G,
            "Search",
            hybrid(image=photo, text="oak", text_weight=2),
            IA,
            contains=("text_weight",),
        )
    )
    add(
        _case(
            "Search NaN text_weight",
            G,
            "Search",
            hybrid(image=photo, text="oak", text_weight=float("nan")),
            IA,
            contains=("text_weight",),
        )
    )
    add(
        _case(
            "Search unknown fusion",
            G,
            "Search",
            hybrid(image=photo, text="oak").SerializeToString() + b"\x30" + _varint(77),
            IA,
            contains=("fusion",),
        )
    )
    add(
        _case(
            "Search huge k", G, "Search", hybrid(image=photo, text="oak", k=2**32 - 1), IA, contains=("100",)
        )
    )
    add(_case("Recommend nothing liked", G, "Recommend", rec(k=3), IA, contains=("liked",)))
    add(
        _case(
            "Recommend unknown liked id",
            G,
            "Recommend",
            rec(liked_listing_ids=["no-such"], k=3),
            NF,
            contains=("no-such",),
        )
    )
    add(
        _case(
            "Recommend too many ids",
            G,
            "Recommend",
            rec(liked_listing_ids=[known], skipped_listing_ids=[f"s{i}" for i in range(600)]),
            IA,
            contains=("500",),
        )
    )
    add(
        _case(
            "Recommend huge k",
            G,
            "Recommend",
            rec(liked_listing_ids=[known], k=2**32 - 1),
            IA,
            contains=("100",),
        )
    )
    add(
        _case(
            "Recommend unknown skipped/seen ids",
            G,
            "Recommend",
            rec(
                liked_listing_ids=[known],
                skipped_listing_ids=["no-such"],
                seen_listing_ids=["no-such-2"],
                k=3,
            ),
            OKC,
        )
    )
    add(
        _case(
            "SimilarListings unknown id",
            G,
            "SimilarListings",
            gateway_pb2.SimilarListingsRequest(listing_id="no-such"),
            NF,
        )
    )
    add(_case("SimilarListings empty id", G, "SimilarListings", gateway_pb2.SimilarListingsRequest(), IA))
    add(
        _case(
            "SimilarListings huge k",
            G,
            "SimilarListings",
            gateway_pb2.SimilarListingsRequest(listing_id=known, k=2**32 - 1),
            IA,
            contains=("100",),
        )
    )
    add(
        _case(
            "GetListing unknown id", G, "GetListing", gateway_pb2.GetListingRequest(listing_id="no-such"), NF
        )
    )
    add(_case("GetListing empty id", G, "GetListing", gateway_pb2.GetListingRequest(), IA))
    add(
        _case(
            "GetListing 100 KB id (message echoing it is clipped)",
            G,
            "GetListing",
            gateway_pb2.GetListingRequest(listing_id="x" * 100_000),
            NF,
            IA,
            contains=("clipped",),
        )
    )
    add(
        _case(
            "GetListing 30 KB non-ASCII id",
            G,
            "GetListing",
            gateway_pb2.GetListingRequest(listing_id="\U0001f600" * 7_500),
            NF,
            IA,
        )
    )
    add(
        _case(
            "RemoveListing 100 KB id",
            G,
            "RemoveListing",
            gateway_pb2.RemoveListingRequest(listing_id="x" * 100_000),
            NF,
            IA,
            write=True,
        )
    )
    add(
        _case(
            "GetListing invalid UTF-8 id", G, "GetListing", b"\x0a\x02\xff\xfe", IA, contains=("not a valid",)
        )
    )
    w = dict(write=True)
    add(_case("AddListing no images", G, "AddListing", addl([]), IA, contains=("image",), **w))
    add(_case("AddListing over max images", G, "AddListing", addl([photo] * 17), IA, contains=("16",), **w))
    add(_case("AddListing random bytes", G, "AddListing", addl([junk]), IA, **w))
    add(_case("AddListing truncated JPEG", G, "AddListing", addl([photo, truncated]), IA, **w))
    add(_case("AddListing empty image", G, "AddListing", addl([b""]), IA, **w))
    add(
        _case(
            "AddListing oversized image",
            G,
            "AddListing",
            addl([over_image]),
            IA,
            contains=("8,388,608",),
            **w,
        )
    )
    add(
        _case(
            "AddListing over the message limit",
            G,
            "AddListing",
            addl([photo, b"\x00" * (16 * MiB)]),
            RE,
            contains=("16777216",),
            **w,
        )
    )
    add(
        _case(
            "AddListing empty title", G, "AddListing", addl([photo], title=" "), IA, contains=("title",), **w
        )
    )
    add(
        _case(
            "AddListing bad id",
            G,
            "AddListing",
            addl([photo], id="../../etc/passwd"),
            IA,
            contains=("listing.id",),
            **w,
        )
    )
    add(
        _case(
            "AddListing NaN price",
            G,
            "AddListing",
            addl([photo], price=float("nan")),
            IA,
            contains=("price",),
            **w,
        )
    )
    add(_case("AddListing negative price", G, "AddListing", addl([photo], price=-1), IA, **w))
    add(
        _case(
            "AddListing unknown category",
            G,
            "AddListing",
            addl([photo], main_category="Cars"),
            IA,
            contains=("Cars",),
            **w,
        )
    )
    add(_case("AddListing image ids set", G, "AddListing", addl([photo], image_ids=["x"]), IA, **w))
    add(_case("AddListing bad currency", G, "AddListing", addl([photo], price=1, currency="pounds"), IA, **w))
    add(_case("AddListing existing id", G, "AddListing", addl([photo], id=known), CODE.ALREADY_EXISTS, **w))
    add(
        _case(
            "RemoveListing unknown id",
            G,
            "RemoveListing",
            gateway_pb2.RemoveListingRequest(listing_id="no-such"),
            NF,
            **w,
        )
    )
    add(_case("RemoveListing empty id", G, "RemoveListing", gateway_pb2.RemoveListingRequest(), IA, **w))

    # -- random bytes as the whole request, to every RPC ----------------------------------------
    random_ok = frozenset({IA, NF, OKC, UNIMPL, RE, CODE.FAILED_PRECONDITION, CODE.ALREADY_EXISTS})
    methods = [(E, m) for m in ("Embed", "Classify", "EmbedText", "GetModelInfo")]
    methods += [
        (f"indexer-{s}", m)
        for s in range(stack.shards)
        for m in ("Upsert", "Delete", "Search", "Fetch", "GetStats")
    ]
    methods += [
        (G, m)
        for m in (
            "ClassifyImage",
            "SearchByImage",
            "SearchByText",
            "Search",
            "SimilarListings",
            "Recommend",
            "GetListing",
            "AddListing",
            "RemoveListing",
        )
    ]
    for round_ in range(random_rounds):
        for target, method in methods:
            size = rng.choice([1, 7, 64, 1024, 65_536])
            data = bytes(rng.getrandbits(8) for _ in range(size)) if size <= 1024 else rng.randbytes(size)
            add(
                Case(
                    f"{method} random request bytes #{round_}",
                    target,
                    method,
                    data,
                    random_ok,
                    (),
                    method in ("Upsert", "Delete", "AddListing", "RemoveListing"),
                )
            )
    return cases


def _followup(stack: Stack, target: str) -> tuple[bool, str]:
    """A normal request to ``target`` that must succeed right after a bad one."""
    photo = stack.photos[1]
    if target == "gateway":
        code, details, reply = stack.gateway(
            "SearchByImage", gateway_pb2.SearchByImageRequest(image=photo, k=3), timeout=60
        )
        ok = code == OK and len(gateway_pb2.SearchListingsResponse.FromString(reply).results) > 0
    elif target == "embedder":
        code, details, reply = stack.embedder("Embed", embedder_pb2.EmbedRequest(images=[photo]), timeout=60)
        ok = code == OK and len(embedder_pb2.EmbedResponse.FromString(reply).embeddings) == 1
    else:
        code, details, reply = stack.call(
            target,
            INDEXER,
            "Search",
            indexer_pb2.SearchRequest(
                collection="image", k=3, queries=[indexer_pb2.Vector(values=stack.good_vector())]
            ),
            timeout=60,
        )
        ok = code == OK and len(indexer_pb2.SearchResponse.FromString(reply).results) == 1
    return ok, f"{code.name}: {details}"


def run_fuzz(
    stack: Stack,
    *,
    random_rounds: int = 3,
    seed: int = 11,
    huge_messages: bool = False,
    max_seconds: float = 600.0,
    log: Callable[[str], None] | None = None,
) -> FuzzStats:
    """Send every bad input once; each must get its precise status (code, and the limit or the bad
    field named in the details), and a normal request to the same service right after must
    succeed. Nothing the fuzz sends is stored: the catalogue count is checked before and after."""
    stats = FuzzStats()
    started = time.monotonic()
    before = _catalogue_ids(stack)
    for case in fuzz_cases(stack, random_rounds=random_rounds, seed=seed, huge_messages=huge_messages):
        if time.monotonic() - started > max_seconds:
            break
        service = {"gateway": GATEWAY, "embedder": EMBEDDER}.get(case.target, INDEXER)
        code, details, _ = stack.call(
            case.target, service, case.method, case.request, timeout=60, write=case.write
        )
        stats.bad_inputs += 1
        stats.by_code[code.name] += 1
        missing = [s for s in case.contains if s.lower() not in details.lower()]
        if code in case.expect and not missing:
            stats.precise += 1
        else:
            expected = "/".join(sorted(c.name for c in case.expect))
            stats.imprecise.append(
                f"{case.target} {case.name}: got {code.name} ({details[:200]!r}), "
                f"expected {expected}" + (f" naming {missing}" if missing else "")
            )
            if log:
                log(stats.imprecise[-1])
        ok, what = _followup(stack, case.target)
        if ok:
            stats.followups_ok += 1
        else:
            stats.followups_failed.append(f"after {case.target} {case.name}: {what}")
    after = _catalogue_ids(stack)
    if after != before:
        stats.imprecise.append(f"the fuzz changed the catalogue: {sorted(after ^ before)[:5]}")
    # Nothing the fuzz upserted may linger on any shard either.
    for shard in range(stack.shards):
        code, _, reply = stack.indexer(
            shard, "Fetch", indexer_pb2.FetchRequest(collection="image", ids=["fuzz-a", "fuzz-b", "f0"])
        )
        if code != OK or indexer_pb2.FetchResponse.FromString(reply).items:
            stats.imprecise.append(f"indexer-{shard}: a rejected upsert left vectors behind")
    stats.seconds = time.monotonic() - started
    return stats


def _catalogue_ids(stack: Stack) -> set[str]:
    import sqlite3

    with sqlite3.connect(f"file:{stack.root / 'catalogue.sqlite3'}?mode=ro", uri=True, timeout=30) as db:
        return {row[0] for row in db.execute("SELECT id FROM listings")}


# ============================================================================ load


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    concurrency: int = 0
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_mid: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)
    acked_writes: int = 0
    lost_writes: int = 0
    lost: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    def rss_growth(self) -> dict[str, int]:
        return {key: self.rss_after.get(key, 0) - self.rss_before.get(key, 0) for key in self.rss_before}


#: The mix of a load: kind -> weight.
LOAD_MIX = {"search": 35, "text": 10, "get": 20, "similar": 15, "classify": 10, "add": 8, "remove": 2}
TEXT_QUERIES = (
    "oak dining table",
    "kids bike",
    "office chair",
    "iphone case",
    "garden tools",
    "leather sofa",
    "ps4 games",
    "baby stroller",
)


class Traffic:
    """Issues one request of a given kind against the stack and records writes in the ledger."""

    def __init__(self, stack: Stack, rng_seed: int, prefix: str, timeout: float = 30.0) -> None:
        self.stack = stack
        self.rng = random.Random(rng_seed)
        self.prefix = prefix
        self.timeout = timeout
        self.counter = 0
        self.lock = threading.Lock()

    def _next_id(self) -> str:
        with self.lock:
            self.counter += 1
            return f"{self.prefix}-{self.counter:06d}"

    def kinds(self, count: int) -> list[str]:
        names, weights = zip(*LOAD_MIX.items())
        return self.rng.choices(names, weights, k=count)

    def one(self, kind: str, n: int) -> tuple[grpc.StatusCode, str]:
        stack, photos = self.stack, self.stack.photos
        photo = photos[n % len(photos)]
        known = stack.bootstrapped[n % len(stack.bootstrapped)].listing_id
        if kind == "search":
            return stack.gateway(
                "SearchByImage", gateway_pb2.SearchByImageRequest(image=photo, k=10), timeout=self.timeout
            )[:2]
        if kind == "text":
            if not stack.text_served:
                return self.one("search", n)
            return stack.gateway(
                "SearchByText",
                gateway_pb2.SearchByTextRequest(query=TEXT_QUERIES[n % len(TEXT_QUERIES)], k=10),
                timeout=self.timeout,
            )[:2]
        if kind == "get":
            return stack.gateway(
                "GetListing", gateway_pb2.GetListingRequest(listing_id=known), timeout=self.timeout
            )[:2]
        if kind == "similar":
            return stack.gateway(
                "SimilarListings",
                gateway_pb2.SimilarListingsRequest(listing_id=known, k=5),
                timeout=self.timeout,
            )[:2]
        if kind == "classify":
            return stack.gateway(
                "ClassifyImage", gateway_pb2.ClassifyImageRequest(image=photo, top_k=3), timeout=self.timeout
            )[:2]
        if kind == "add":
            listing_id = self._next_id()
            code, details, image_ids = stack.add_listing(listing_id, [photo], timeout=self.timeout)
            if code == OK:
                stack.ledger.acknowledge(Write(listing_id, image_ids, shard_of(listing_id, stack.shards)))
            else:
                stack.ledger.mark_uncertain(listing_id)  # may be half-added if the gateway died
            return code, details
        if kind == "remove":
            with self.lock:
                write = stack.ledger.take_for_removal(
                    self.rng, keep=[w.listing_id for w in stack.bootstrapped]
                )
            if write is None:
                return self.one("get", n)
            code, details, _ = stack.gateway(
                "RemoveListing",
                gateway_pb2.RemoveListingRequest(listing_id=write.listing_id),
                timeout=self.timeout,
                write=True,
            )
            stack.ledger.removal_done(write, code == OK)
            return code, details
        raise ValueError(kind)


class RssMonitor:
    """Samples every service's RSS in the background; keeps the peak per service."""

    def __init__(self, stack: Stack, every_s: float = 0.25) -> None:
        self.stack = stack
        self.every_s = every_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, rss in self.stack.rss().items():
                self.peak[key] = max(self.peak.get(key, 0), rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_load(
    stack: Stack,
    requests: int = 200,
    concurrency: int = 16,
    *,
    seed: int = 5,
    max_seconds: float = 300.0,
    timeout: float = 30.0,
    warmup: int = 8,
) -> LoadStats:
    """A fixed number of requests (the `LOAD_MIX` of searches, reads and writes) from
    ``concurrency`` threads, as fast as the stack answers; stops after ``requests`` or
    ``max_seconds``, whichever comes first. Every request must succeed; RSS of every service is
    taken before (after ``warmup`` requests), half-way, after, and sampled for the peak. Then
    every acknowledged write is checked (`verify_writes`)."""
    traffic = Traffic(stack, seed, prefix=f"load{seed}")
    for n, kind in enumerate(["search", "classify", "similar", "get"] * max(1, warmup // 4)):
        traffic.one(kind, n)  # warm-up: caches, connections, allocator pools
    stats = LoadStats(concurrency=concurrency, rss_before=stack.rss())
    acked_before = stack.ledger.acked
    kinds = traffic.kinds(requests)
    lock = threading.Lock()
    next_index = iter(range(requests))
    started = time.monotonic()
    half = requests // 2

    def worker() -> None:
        while time.monotonic() - started < max_seconds:
            with lock:
                n = next(next_index, None)
            if n is None:
                return
            if n == half:
                stats.rss_mid = stack.rss()
            t0 = time.perf_counter()
            code, details = traffic.one(kinds[n], n)
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                stats.sent += 1
                stats.by_kind[kinds[n]] += 1
                stats.latencies_ms.append(elapsed)
                if code == OK:
                    stats.ok += 1
                else:
                    stats.failed += 1
                    stats.failures[f"{kinds[n]} {code.name}: {details[:120]}"] += 1

    with RssMonitor(stack) as monitor:
        threads = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max_seconds + timeout + 5)
    stats.seconds = time.monotonic() - started
    stats.rss_after = stack.rss()
    stats.rss_peak = monitor.peak
    stats.acked_writes = stack.ledger.acked - acked_before
    stats.lost = verify_writes(stack, stack.ledger)
    stats.lost_writes = len(stats.lost)
    return stats


# ============================================================================ faults


@dataclass
class Probe:
    """One request made while a service was down (or right after it came back)."""

    service: str
    rpc: str
    code: str
    seconds: float
    deadline_s: float
    details: str = ""


@dataclass
class Outage:
    service: str
    probes: list[Probe] = field(default_factory=list)
    restart_s: float = 0.0  # from spawn to SERVING
    recovered_s: float = 0.0  # from SERVING to the first successful probe
    problems: list[str] = field(default_factory=list)


@dataclass
class FaultStats:
    sent: int = 0
    ok: int = 0
    unavailable: int = 0  # expected while a service is down
    deadline_exceeded: int = 0
    unexpected: Counter = field(default_factory=Counter)
    acked_writes: int = 0
    lost_writes: int = 0
    lost: list[str] = field(default_factory=list)
    unacked_writes: int = 0  # writes that failed (outcome unknown to the client; not counted)
    outages: list[Outage] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        """Requests that failed other than with UNAVAILABLE/DEADLINE_EXCEEDED during an outage."""
        return sum(self.unexpected.values())

    @property
    def problems(self) -> list[str]:
        return [p for outage in self.outages for p in outage.problems]


class BackgroundLoad:
    """Reads and writes from a few threads until stopped (or ``max_requests`` / ``max_seconds``),
    tolerating UNAVAILABLE / DEADLINE_EXCEEDED while a service is down."""

    def __init__(
        self,
        stack: Stack,
        stats: FaultStats,
        *,
        concurrency: int,
        max_requests: int,
        max_seconds: float,
        timeout: float,
        pause_s: float = 0.02,
        failure_pause_s: float = 0.2,
        seed: int = 9,
    ) -> None:
        self.traffic = Traffic(stack, seed, prefix=f"fault{seed}", timeout=timeout)
        self.stats = stats
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause_s = pause_s
        self.failure_pause_s = failure_pause_s
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.kinds = self.traffic.kinds(max_requests)
        self.issued = 0
        self.threads: list[threading.Thread] = []

    def _worker(self) -> None:
        started = time.monotonic()
        while not self.stop_event.is_set() and time.monotonic() - started < self.max_seconds:
            with self.lock:
                if self.issued >= self.max_requests:
                    return
                n = self.issued
                self.issued += 1
            code, details = self.traffic.one(self.kinds[n], n)
            with self.lock:
                self.stats.sent += 1
                if code == OK:
                    self.stats.ok += 1
                elif code == CODE.UNAVAILABLE:
                    self.stats.unavailable += 1
                elif code == CODE.DEADLINE_EXCEEDED:
                    self.stats.deadline_exceeded += 1
                else:
                    self.stats.unexpected[f"{self.kinds[n]} {code.name}: {details[:120]}"] += 1
            # back off a little after a failure, as a real client would, so an outage does not
            # turn the load into a busy loop that starves the restarting service of CPU
            self.stop_event.wait(self.pause_s if code == OK else self.failure_pause_s)

    def __enter__(self) -> "BackgroundLoad":
        self.threads = [
            threading.Thread(target=self._worker, name=f"fault-load-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(self.traffic.timeout + 10)


def _probe(
    outage: Outage,
    stack: Stack,
    rpc: str,
    call: Callable[[], tuple],
    deadline_s: float,
    expect: grpc.StatusCode | None,
) -> Probe:
    t0 = time.monotonic()
    code, details = call()[:2]
    probe = Probe(outage.service, rpc, code.name, time.monotonic() - t0, deadline_s, details[:160])
    outage.probes.append(probe)
    if expect is not None and code != expect:
        outage.problems.append(
            f"{outage.service} down: {rpc} answered {code.name} ({details[:160]}), expected {expect.name}"
        )
    elif probe.seconds > deadline_s + 0.5:
        outage.problems.append(
            f"{outage.service} down: {rpc} took {probe.seconds:.2f}s, over its {deadline_s:.1f}s deadline"
        )
    return probe


def _wait_recovered(stack: Stack, outage: Outage, within_s: float) -> None:
    """Poll SearchByImage until it succeeds (full service), at most ``within_s`` seconds."""
    since = time.monotonic()
    request = gateway_pb2.SearchByImageRequest(image=stack.photos[2], k=3)
    last = ""
    while time.monotonic() - since < within_s:
        code, details, reply = stack.gateway("SearchByImage", request, timeout=10)
        if code == OK and gateway_pb2.SearchListingsResponse.FromString(reply).results:
            outage.recovered_s = time.monotonic() - since
            return
        last = f"{code.name}: {details[:160]}"
        time.sleep(0.1)
    outage.problems.append(
        f"after restarting {outage.service}: no full service within {within_s:.0f}s (last: {last})"
    )


def run_faults(
    stack: Stack,
    *,
    services: Iterable[str] | None = None,
    concurrency: int = 4,
    max_requests: int = 2000,
    max_seconds: float = 300.0,
    deadline_s: float = 5.0,
    recover_within_s: float = 30.0,
    outage_s: float = 1.0,
    seed: int = 9,
) -> FaultStats:
    """While a bounded background load of reads and AddListing/RemoveListing writes runs, SIGKILL
    each of ``services`` in turn (default: the embedder, the first indexer shard, the gateway),
    probe the gateway during the outage (UNAVAILABLE within ``deadline_s`` for what needs the dead
    service; catalogue reads keep working while a downstream is down), restart it on the same port,
    check full service comes back, and finally that every acknowledged write is still there."""
    services = list(services or ["embedder", "indexer-0", "gateway"])
    stats = FaultStats()
    started = time.monotonic()
    acked_before = stack.ledger.acked
    photo = stack.photos[3]
    bootstrapped_listing = stack.bootstrapped[0].listing_id

    def search():
        return stack.gateway(
            "SearchByImage", gateway_pb2.SearchByImageRequest(image=photo, k=3), timeout=deadline_s
        )

    def get():
        return stack.gateway(
            "GetListing", gateway_pb2.GetListingRequest(listing_id=bootstrapped_listing), timeout=deadline_s
        )

    with BackgroundLoad(
        stack,
        stats,
        concurrency=concurrency,
        max_requests=max_requests,
        max_seconds=max_seconds,
        timeout=deadline_s * 2,
        seed=seed,
    ):
        time.sleep(outage_s)  # load under way before the first kill
        for key in services:
            outage = Outage(key)
            stats.outages.append(outage)
            stack.kill(key)
            if key == "gateway":
                _probe(outage, stack, "GetListing", get, deadline_s, CODE.UNAVAILABLE)
                _probe(outage, stack, "SearchByImage", search, deadline_s, CODE.UNAVAILABLE)
            else:
                shard = int(key.split("-")[1]) if key.startswith("indexer-") else 0
                target_id = stack.listing_id_on_shard(shard, f"probe{seed}")
                stack.ledger.mark_uncertain(target_id)
                _probe(outage, stack, "SearchByImage", search, deadline_s, CODE.UNAVAILABLE)
                _probe(
                    outage,
                    stack,
                    "AddListing",
                    lambda: stack.add_listing(target_id, [photo], timeout=deadline_s),
                    deadline_s,
                    CODE.UNAVAILABLE,
                )
                if key.startswith("indexer-"):
                    on_shard = next((w.listing_id for w in stack.bootstrapped if w.shard == shard), None)
                    if on_shard is not None:
                        _probe(
                            outage,
                            stack,
                            "SimilarListings",
                            lambda: stack.gateway(
                                "SimilarListings",
                                gateway_pb2.SimilarListingsRequest(listing_id=on_shard, k=3),
                                timeout=deadline_s,
                            ),
                            deadline_s,
                            CODE.UNAVAILABLE,
                        )
                _probe(outage, stack, "GetListing (catalogue only)", get, deadline_s, OK)
            time.sleep(outage_s)  # the load keeps running against the outage
            outage.restart_s = stack.restart(key)
            _wait_recovered(stack, outage, recover_within_s)
            fresh = stack.listing_id_on_shard(
                int(key.split("-")[1]) if key.startswith("indexer-") else 0, f"after{seed}"
            )
            code, details, image_ids = stack.add_listing(fresh, [photo], timeout=30)
            if code == OK:  # writes work again, on the shard that was down
                stack.ledger.acknowledge(Write(fresh, image_ids, shard_of(fresh, stack.shards)))
            else:
                outage.problems.append(f"after restarting {key}: AddListing {code.name}: {details}")
            lost_now = verify_writes(stack, stack.ledger)
            outage.problems += [f"after restarting {key}: lost {line}" for line in lost_now]
            time.sleep(outage_s)
    stats.lost = verify_writes(stack, stack.ledger)
    stats.lost_writes = len(stats.lost)
    stats.acked_writes = stack.ledger.acked - acked_before
    stats.unacked_writes = len(stack.ledger.uncertain)
    stats.seconds = time.monotonic() - started
    return stats


# ============================================================================ reporting


#: Figure lines the tests report; conftest prints them in the terminal summary.
FIGURES: list[str] = []


def report(record_property, title: str, line: str, **properties) -> None:
    """For tests: print a figure line now (shows with -s), keep it for the "reliability figures"
    section of the terminal summary, and record it as JUnit properties."""
    print(f"\n{line}")
    FIGURES.append(line)
    record_property(title, line)
    for name, value in properties.items():
        record_property(name, value)


def mib(value: int) -> str:
    return f"{value / MiB:.0f} MiB"


def figures(
    fuzz: FuzzStats | None = None, load: LoadStats | None = None, faults: FaultStats | None = None
) -> dict[str, int]:
    """The four headline figures over whatever parts ran."""
    sent = (load.sent if load else 0) + (faults.sent if faults else 0) + (fuzz.bad_inputs if fuzz else 0)
    failed = (
        (load.failed if load else 0)
        + (faults.failed if faults else 0)
        + (len(fuzz.imprecise) + len(fuzz.followups_failed) if fuzz else 0)
    )
    return {
        "sent": sent,
        "failed": failed,
        "bad_inputs": fuzz.bad_inputs if fuzz else 0,
        "lost_writes": (load.lost_writes if load else 0) + (faults.lost_writes if faults else 0),
    }


def result_line(values: dict[str, int]) -> str:
    return "RESULT " + " ".join(f"{key}={value}" for key, value in values.items())


def describe_fuzz(stats: FuzzStats) -> str:
    codes = ", ".join(f"{name} {count}" for name, count in sorted(stats.by_code.items()))
    return (
        f"fuzz: bad_inputs={stats.bad_inputs} precise={stats.precise} "
        f"imprecise={len(stats.imprecise)} followups_ok={stats.followups_ok} "
        f"followups_failed={len(stats.followups_failed)} in {stats.seconds:.1f}s ({codes})"
    )


def describe_load(stats: LoadStats) -> str:
    rss = ", ".join(
        f"{key} {mib(stats.rss_before[key])}->{mib(stats.rss_after.get(key, 0))} "
        f"(peak {mib(stats.rss_peak.get(key, 0))})"
        for key in stats.rss_before
    )
    return (
        f"load: sent={stats.sent} failed={stats.failed} concurrency={stats.concurrency} "
        f"in {stats.seconds:.1f}s ({stats.rps:.1f} req/s, p50 {stats.percentile(50):.0f} ms, "
        f"p99 {stats.percentile(99):.0f} ms) acked_writes={stats.acked_writes} "
        f"lost_writes={stats.lost_writes}; RSS {rss}"
    )


def describe_faults(stats: FaultStats) -> str:
    lines = [
        f"faults: sent={stats.sent} ok={stats.ok} unavailable={stats.unavailable} "
        f"deadline_exceeded={stats.deadline_exceeded} failed={stats.failed} "
        f"acked_writes={stats.acked_writes} lost_writes={stats.lost_writes} "
        f"unacked_writes={stats.unacked_writes} in {stats.seconds:.1f}s"
    ]
    for outage in stats.outages:
        probes = ", ".join(f"{p.rpc} {p.code} in {p.seconds:.2f}s" for p in outage.probes)
        lines.append(
            f"  {outage.service} killed: {probes}; back in {outage.restart_s:.1f}s, "
            f"full service {outage.recovered_s:.1f}s later"
        )
    return "\n".join(lines)


def as_json(**parts) -> str:
    """The stats as JSON (for record_property / artefacts)."""

    def plain(value):
        if isinstance(value, Counter):
            return dict(value)
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(v) for k, v in value.__dict__.items() if k != "latencies_ms"}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return json.dumps({name: plain(value) for name, value in parts.items()}, default=str)
