"""Embedder throughput and latency: raw model vs the service (dynamic batching) vs the seed's way.

    python -m benchmarks.embedder            # ~15 s per cell
    python -m benchmarks.embedder --quick    # about a minute
    python -m benchmarks.embedder --bf16-check   # also: bf16 autocast accuracy and speed

At concurrency c, for each path:

(a) raw       the model in-process, one thread: decode + preprocess b = min(c, batch size)
              images, one forward pass of b (inference_mode); latency = the whole iteration.
(b) service   ``python -m services.embedder`` over gRPC with its defaults: c closed-loop
              clients, one image per request; the service decodes in parallel, batches
              concurrent requests and runs them on min(2, cores) model workers that share the
              cores out as torch threads, with batch norms folded into the convolutions.
(c) seed      a gRPC server doing what the seed's web handler did: one image per request,
              decode + a batch-1 forward (torch.no_grad) of the model as loaded, in the
              request's handler thread.

All three pay the same decode + preprocess per image (``common.images.open_image`` +
``Preprocessing.transform``). (a) and (b) run the same folded model; (a) and (c) use
``--torch-threads`` (default: every core). The last line is
``RESULT service_vs_raw=... service_vs_seed=...`` at concurrency 32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._timing import WindowCell, closed_loop, cpu_name, load_line
from common.config import REPO_ROOT

ARTIFACTS_DIR = REPO_ROOT / "artifacts"
BENCH_ARTIFACT_DIR = REPO_ROOT / "build" / "bench" / "embedder-test-artifact"
MARKETPLACE_IMAGES = REPO_ROOT.parent / "shared" / "data" / "marketplace" / "images"


# ------------------------------------------------------------------ inputs


def find_artifact() -> tuple[Path, str]:
    """The newest trained artefact under artifacts/, else the test artefact (built once)."""
    cards = sorted(ARTIFACTS_DIR.glob("**/model_card.json"), key=lambda p: p.stat().st_mtime)
    if cards:
        return cards[-1].parent, "trained"
    from tests.support.artifacts import make_test_artifact
    return (make_test_artifact(BENCH_ARTIFACT_DIR),
            "test artefact: pretrained backbone, random head")


def load_photos(count: int) -> list[bytes]:
    """``count`` encoded real photos (marketplace listings; scikit-image samples as a fallback)."""
    files = sorted(MARKETPLACE_IMAGES.glob("*.jpg"))[:count] if MARKETPLACE_IMAGES.is_dir() else []
    if files:
        return [path.read_bytes() for path in files]
    from tests.support.photos import real_photos
    samples = real_photos(4)
    return [samples[i % len(samples)] for i in range(count)]


# ------------------------------------------------------------------ measuring


def raw_cell(model, photos: list[bytes], level: int, batch_size: int, warmup_s: float,
             measure_s: float) -> WindowCell:
    """(a): decode + preprocess + forward in one thread, at the batch the service would form."""
    import torch

    size = min(level, batch_size)
    model.warm_up((size,))
    cursor = [0]

    def one_batch(_: int, __: int) -> int:
        start = cursor[0]
        cursor[0] = (start + size) % len(photos)
        chosen = [photos[(start + i) % len(photos)] for i in range(size)]
        model.forward(torch.stack([model.preprocess(data) for data in chosen]))
        return size

    return closed_loop(one_batch, 1, warmup_s, measure_s)


def server_cell(stub, photos: list[bytes], level: int, warmup_s: float,
                measure_s: float) -> WindowCell:
    """(b) and (c): ``level`` clients, one image per Embed request, closed loop."""
    from marketplace.embedder.v1 import embedder_pb2

    requests = [embedder_pb2.EmbedRequest(images=[data]) for data in photos]
    counters = list(range(level))

    def one_request(worker: int, _: int) -> int:
        counters[worker] = (counters[worker] + level) % len(requests)
        reply = stub.Embed(requests[counters[worker]], timeout=300)
        return len(reply.embeddings)

    return closed_loop(one_request, level, warmup_s, measure_s)


# ------------------------------------------------------------------ servers


def start_server(name: str, env: dict[str, str], log_dir: Path, *, module: str | None = None,
                 args: list[str] | None = None):
    """``python -m <module>`` (default ``services.<name>``) on a free port, SERVING on return."""
    from scripts.stack import free_port, spawn, wait_healthy

    server = spawn(name, free_port(), log_dir / f"{name}.log", env, args, module=module)
    try:
        wait_healthy(server.address, 300, server.process, server.log_path)
    except Exception:
        server.stop(30)
        raise
    return server


def serve_seed(argv: list[str]) -> None:
    """(c) The seed's way, behind the same gRPC contract: per request and in the handler thread,
    decode each upload and run the model at batch 1 (torch.no_grad, as the seed's predict did)."""
    import grpc
    import torch

    from common.images import ImageError, open_image
    from common.model import load_artifact
    from common.serving import create_server, serve_until_signal
    from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc

    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact-dir", type=Path, required=True)
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    artifact = load_artifact(args.artifact_dir)
    model, transform = artifact.model.eval(), artifact.preprocessing.transform()

    class SeedStyleEmbedder(embedder_pb2_grpc.EmbedderServicer):
        def Embed(self, request, context):
            vectors = []
            for data in request.images:
                try:
                    image = open_image(data)
                except ImageError as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                with torch.no_grad():
                    embedding, _ = model.embed_and_classify(transform(image).unsqueeze(0))
                vectors.append(embedder_pb2.Vector(values=embedding[0].tolist()))
            return embedder_pb2.EmbedResponse(embeddings=vectors, model_version=artifact.version)

    def register(server):
        embedder_pb2_grpc.add_EmbedderServicer_to_server(SeedStyleEmbedder(), server)
        return ["marketplace.embedder.v1.Embedder"]

    server = create_server(register, f"{args.host}:{args.port}")
    server.set_serving(True)
    serve_until_signal(server, grace=1)


# ------------------------------------------------------------------ bf16


def bf16_check(artifact_dir: Path, photos: list[bytes], batch_size: int, seconds: float) -> None:
    """Accuracy and speed of bf16 autocast against float32 on the same photos."""
    import torch

    from common.model import load_artifact
    from services.embedder.engine import ImageModel, detect_bf16

    support = detect_bf16()
    print(f"\nbf16 autocast check: native support: {'yes' if support.native else 'no'} "
          f"({support.reason})")
    fp32 = ImageModel(load_artifact(artifact_dir))
    bf16 = ImageModel(load_artifact(artifact_dir), bf16=True)
    inputs = torch.stack([fp32.preprocess(data) for data in photos])
    e32, p32 = fp32.forward(inputs)
    e16, p16 = bf16.forward(inputs)
    cos = np.sum(e32 * e16, axis=1)
    agree = float(np.mean(p32.argmax(1) == p16.argmax(1)))
    print(f"  {len(photos)} photos: embedding cosine(fp32, bf16) min {cos.min():.4f} "
          f"mean {cos.mean():.4f}; top-1 category agreement {agree:.1%}; "
          f"max |prob diff| {np.abs(p32 - p16).max():.4f}")
    batch = inputs[:batch_size]
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        model.warm_up((len(batch),))
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.forward(batch)
            done += len(batch)
        print(f"  {name}: {done / (time.perf_counter() - start):6.1f} img/s (forward only, "
              f"batch {len(batch)})")


# ------------------------------------------------------------------ report


def log_entry(log_text: str, message: str) -> dict | None:
    """The last JSON log line of the service whose ``msg`` is ``message``."""
    for line in reversed(log_text.splitlines()):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("msg") == message:
            return entry
    return None


def service_setup(log_text: str) -> str:
    """How the service ran its model and how its batches came out, from its own log."""
    loaded, stats = log_entry(log_text, "model loaded"), log_entry(log_text, "batcher stats")
    parts = []
    if loaded:
        parts.append(f"{loaded['model_workers']} model worker(s) x {loaded['torch_threads']} "
                     f"torch thread(s), {loaded['folded_batch_norms']} batch norms folded")
    if stats:
        parts.append(f"{stats['batches']} model calls, mean batch {stats['mean_batch']:.1f}, "
                     f"sizes {stats['histogram']}")
    return "; ".join(parts) or "no model/batcher lines in the service log"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--serve-seed" in argv:
        serve_seed([arg for arg in argv if arg != "--serve-seed"])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embedder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short cells, about a minute")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=8, help="model batch of the service")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--model-workers", type=int, default=0,
                        help="the service's EMBEDDER_MODEL_WORKERS (0: its default, min(2, "
                             "cores), each with the cores shared out as torch threads)")
    parser.add_argument("--seconds", type=float, default=None, help="measuring time per cell")
    parser.add_argument("--bf16-check", action="store_true")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    warmup_s = 0.5 if args.quick else 3.0

    def measure_s(level: int) -> float:
        """Batched paths complete images in bursts of a batch, so the window grows with the
        concurrency to keep that granularity a small part of the count."""
        if args.seconds:
            return args.seconds
        return (2.0 + level / 8) if args.quick else 15.0

    import torch
    torch.set_num_threads(args.torch_threads)
    artifact_dir, kind = find_artifact()
    photos = load_photos(64)
    card = json.loads((artifact_dir / "model_card.json").read_text())
    print(f"embedder benchmark: {card['model_version']} ({kind}, {artifact_dir}), "
          f"{card['input_size']}px, {len(photos)} real 512x512 photos")
    print(f"{cpu_name()}, torch {torch.__version__} with {args.torch_threads} threads; "
          f"service: model batch {args.batch_size}, max wait {args.max_wait_ms} ms; "
          f"{warmup_s:g} s warm-up + "
          f"{', '.join(f'{measure_s(level):g}' for level in levels)} s per cell")
    print(f"before: {load_line()}", flush=True)

    import grpc

    from marketplace.embedder.v1 import embedder_pb2_grpc
    from services.embedder.engine import ImageModel

    raw_model = ImageModel.load(artifact_dir)
    raw, served, seeded = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-embedder-") as tmp:
        # Both servers run (idle) for the whole benchmark so the three paths of one concurrency
        # are measured back to back, under the same background load.
        service = start_server("embedder", {
            "EMBEDDER_ARTIFACT_DIR": str(artifact_dir),
            "EMBEDDER_BATCH_SIZE": str(args.batch_size),
            "EMBEDDER_MAX_WAIT_MS": str(args.max_wait_ms),
            "EMBEDDER_MODEL_WORKERS": str(args.model_workers),
            "LOG_LEVEL": "info"}, Path(tmp))
        seed = None
        try:
            seed = start_server("seed", {}, Path(tmp), module="benchmarks.embedder",
                                args=["--serve-seed", "--artifact-dir", str(artifact_dir),
                                      "--torch-threads", str(args.torch_threads)])
            with grpc.insecure_channel(service.address) as service_channel, \
                    grpc.insecure_channel(seed.address) as seed_channel:
                service_stub = embedder_pb2_grpc.EmbedderStub(service_channel)
                seed_stub = embedder_pb2_grpc.EmbedderStub(seed_channel)
                for level in levels:
                    seconds = measure_s(level)
                    raw[level] = raw_cell(raw_model, photos, level, args.batch_size, warmup_s,
                                          seconds)
                    served[level] = server_cell(service_stub, photos, level, warmup_s, seconds)
                    seeded[level] = server_cell(seed_stub, photos, level, warmup_s, seconds)
                    print(f"  c={level}: raw {raw[level].per_s:.1f}, service "
                          f"{served[level].per_s:.1f}, seed "
                          f"{seeded[level].per_s:.1f} img/s ({load_line()})", flush=True)
        finally:
            service.stop(30)
            service_log = service.log_path.read_text(errors="replace")
            if seed is not None:
                seed.stop(30)

    print("\nimages/s and per-image latency (ms); every path includes decode + preprocess")
    print("(a) raw = in-process model, batch min(c, model batch), one thread; (b) service = "
          "gRPC, 1 image/request, dynamic batching; (c) seed = gRPC, 1 image/request, batch-1 "
          "model call in the handler thread")
    header = (f"{'conc':>4} | {'(a) raw img/s':>13} {'p50':>7} {'p99':>7} | "
              f"{'(b) svc img/s':>13} {'p50':>7} {'p99':>7} | "
              f"{'(c) seed img/s':>14} {'p50':>7} {'p99':>7} | {'b/a':>5} {'b/c':>5}")
    print(header)
    print("-" * len(header))
    for level in levels:
        a, b, c = raw[level], served[level], seeded[level]
        print(f"{level:>4} | {a.per_s:>13.1f} {a.percentile(50):>7.0f} "
              f"{a.percentile(99):>7.0f} | "
              f"{b.per_s:>13.1f} {b.percentile(50):>7.0f} {b.percentile(99):>7.0f} | "
              f"{c.per_s:>14.1f} {c.percentile(50):>7.0f} {c.percentile(99):>7.0f} | "
              f"{b.per_s / a.per_s:>5.2f} {b.per_s / c.per_s:>5.2f}")
    print(f"service over the whole run: {service_setup(service_log)}")

    if args.bf16_check:
        bf16_check(artifact_dir, photos[:16 if args.quick else 64], args.batch_size,
                   3.0 if args.quick else 10.0)

    print(f"after: {load_line()}")
    top = max(levels)
    b = served[top].per_s
    print(f"RESULT service_vs_raw={b / raw[top].per_s:.2f} "
          f"service_vs_seed={b / seeded[top].per_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
