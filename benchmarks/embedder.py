"""Embedder throughput and latency: the model in each inference runtime vs the service (dynamic
batching, on the best runtime) vs the seed's way.

    python -m benchmarks.embedder            # ~15 s per cell
    python -m benchmarks.embedder --quick    # a few minutes

At concurrency c, for each path:

(a) raw       the model in-process: decode + preprocess b images, one forward pass of b
              (inference_mode); latency = the whole iteration. Each runtime runs in its best
              thread layout for the cell, measured side by side: one loop with every core as
              its threads (b = min(c, batch size)), or one loop per core with one thread each
              (b = min(c / loops, batch size), so no more than c images are in flight).
(b) service   ``python -m services.embedder`` over gRPC with its defaults: c closed-loop
              clients, one image per request; the service decodes in parallel, batches
              concurrent requests and runs them on min(2, cores) model workers that share the
              cores out as torch threads, with batch norms folded into the convolutions.
(c) seed      a gRPC server doing what the seed's web handler did: one image per request,
              decode + a batch-1 forward (torch.no_grad) of the model as loaded, in the
              request's handler thread.

(d) runtime   as (a), the model compiled in another runtime (`common.runtimes`): one column per
              runtime and precision that is installed and passes the load-time check against
              torch on the artefact's check photos (refusals are printed with their reason),
              each in its best thread layout, as torch in (a).
(e) model     each runtime alone: forward passes of an already preprocessed batch of the
              service's model batch size, in each thread layout; the best layout counts.

(a)-(c) pay the same decode + preprocess per image (``common.images.open_image`` +
``Preprocessing.transform``), which costs about as much CPU as the model in the fastest runtime,
so (d) over (a) understates what a runtime gains; (e) is the runtime's own speed. (a) and (b)
run the same folded model; (c) uses ``--torch-threads`` (default: every core). An artefact
without runtime files (older than the runtimes) is copied under build/bench/ and given them.
The last line is ``RESULT runtime_vs_torch=... runtime_vs_torch_model=... service_vs_raw=...
service_vs_seed=... images_per_s_c32=...`` at the highest concurrency: the fastest checked raw
runtime over raw torch (decode included, (d) over (a)), the same for the model alone ((e)), the
service over that fastest raw runtime, the service over the seed, and the service's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


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

    return (make_test_artifact(BENCH_ARTIFACT_DIR), "test artefact: pretrained backbone, random head")


def load_photos(count: int) -> list[bytes]:
    """``count`` encoded real photos (marketplace listings; scikit-image samples as a fallback)."""
    files = sorted(MARKETPLACE_IMAGES.glob("*.jpg"))[:count] if MARKETPLACE_IMAGES.is_dir() else []
    if files:
        return [path.read_bytes() for path in files]
    from tests.support.photos import real_photos

    samples = real_photos(4)
    return [samples[i % len(samples)] for i in range(count)]


# ------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Layout:
    """How a runtime shares the cores: ``loops`` closed loops (model workers) of ``threads``
    threads each."""

    loops: int
    threads: int

    def __str__(self) -> str:
        return f"{self.loops}x{self.threads}"

    def batch(self, level: int, batch_size: int) -> int:
        """Each loop's batch at concurrency ``level``: no more than ``level`` images in flight."""
        return max(1, min(level // self.loops, batch_size))

    def fits(self, level: int) -> bool:
        return self.loops <= level


def layouts(cores: int) -> list[Layout]:
    """One loop using every core, and (with several cores) one single-threaded loop per core."""
    return [Layout(1, cores)] + ([Layout(cores, 1)] if cores > 1 else [])


def raw_cell(
    model,
    photos: list[bytes],
    level: int,
    batch_size: int,
    warmup_s: float,
    measure_s: float,
    layout: Layout = Layout(1, 1),
) -> WindowCell:
    """(a)/(d): decode + preprocess + forward, ``layout.loops`` loops at the batch the service
    would form."""
    import torch

    size = layout.batch(level, batch_size)
    model.warm_up((size,))

    def one_batch(worker: int, i: int) -> int:
        start = (i * size) % len(photos)
        chosen = [photos[(start + k) % len(photos)] for k in range(size)]
        model.forward(torch.stack([model.preprocess(data) for data in chosen]))
        return size

    return closed_loop(one_batch, layout.loops, warmup_s, measure_s)


def model_cell(model, batch, layout: Layout, warmup_s: float, measure_s: float) -> WindowCell:
    """(e): forward passes of one preprocessed batch, ``layout.loops`` loops."""
    model.warm_up((len(batch),))

    def one_batch(_: int, __: int) -> int:
        model.forward(batch)
        return len(batch)

    return closed_loop(one_batch, layout.loops, warmup_s, measure_s)


def server_cell(stub, photos: list[bytes], level: int, warmup_s: float, measure_s: float) -> WindowCell:
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


def start_server(
    name: str, env: dict[str, str], log_dir: Path, *, module: str | None = None, args: list[str] | None = None
):
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


# ------------------------------------------------------------------ runtimes

#: (runtime, precision) columns of (d); each is shown when installed and passing its check.
RUNTIME_COLUMNS = (
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)


def with_runtime_files(artifact_dir: Path) -> Path:
    """``artifact_dir`` if it carries the runtime files, else a copy under build/bench/ given
    them (check photos and calibration photos from the marketplace photos the cells don't use)."""
    from common.model import add_runtime_files, runtime_model_file

    card = json.loads((artifact_dir / "model_card.json").read_text())
    if runtime_model_file(artifact_dir, card, "fp32") is not None:
        return artifact_dir
    copy = REPO_ROOT / "build" / "bench" / f"{card['model_version']}-runtimes"
    copied = (
        json.loads((copy / "model_card.json").read_text()) if (copy / "model_card.json").is_file() else {}
    )
    if runtime_model_file(copy, copied, "fp32") is not None:
        return copy
    import shutil

    shutil.copytree(artifact_dir, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("embeddings"))
    files = sorted(MARKETPLACE_IMAGES.glob("*.jpg")) if MARKETPLACE_IMAGES.is_dir() else []
    print(f"adding runtime files to a copy of the artefact in {copy} ...", flush=True)
    add_runtime_files(copy, check_photos=files[64:80], calibration_photos=files[80:144])
    return copy


def load_runtimes(artifact_dir: Path, cores: int) -> dict[str, dict[Layout, object]]:
    """(d): each runtime column that loads and passes its check, by label, compiled for each
    layout (streams and threads as the layout says); refusals printed."""
    from common.model import ArtifactError
    from services.embedder.engine import ImageModel

    models: dict[str, dict[Layout, object]] = {}
    for runtime, precision in RUNTIME_COLUMNS:
        label = f"{runtime} {precision}"
        try:
            compiled = {
                layout: ImageModel.load(
                    artifact_dir,
                    runtime=runtime,
                    precision=precision,
                    threads=layout.threads,
                    workers=layout.loops,
                )
                for layout in layouts(cores)
            }
        except ArtifactError as exc:
            print(f"  (d) {label}: not measured: {exc}")
            continue
        print(f"  (d) {label}: {next(iter(compiled.values())).choice.check.describe()}")
        models[label] = compiled
    return models


def counts(label: str) -> bool:
    """Whether a column counts for the targets (fp32 or bf16; int8 is reported only)."""
    return not label.endswith("int8")


def best_layout_cell(
    measure: Callable[[Layout], WindowCell], level: int, cores: int, set_threads: Callable[[int], None]
) -> tuple[WindowCell, Layout]:
    """The fastest of ``measure(layout)`` over the layouts that fit the concurrency."""
    cells = []
    for layout in layouts(cores):
        if layout.fits(level):
            set_threads(layout.threads)
            cells.append((measure(layout), layout))
    return max(cells, key=lambda item: item[0].per_s)


# ------------------------------------------------------------------ report


def print_cells(columns: dict[str, dict[int, WindowCell]], levels: list[int]) -> None:
    """One row per concurrency: images/s, p50 and p99 (ms) of every column."""
    header = f"{'conc':>4} | " + " | ".join(f"{name:>20} {'p50':>6} {'p99':>6}" for name in columns)
    print(header)
    print("-" * len(header))
    for level in levels:
        print(
            f"{level:>4} | "
            + " | ".join(
                f"{cells[level].per_s:>20.1f} {cells[level].percentile(50):>6.0f} "
                f"{cells[level].percentile(99):>6.0f}"
                for cells in columns.values()
            )
        )


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
        parts.append(
            f"runtime {loaded.get('runtime', 'torch')} {loaded.get('precision', '')}, "
            f"{loaded['model_workers']} model worker(s) x {loaded.get('threads')} "
            f"thread(s), {loaded['folded_batch_norms']} batch norms folded"
        )
    if stats:
        parts.append(
            f"{stats['batches']} model calls, mean batch {stats['mean_batch']:.1f}, "
            f"sizes {stats['histogram']}"
        )
    return "; ".join(parts) or "no model/batcher lines in the service log"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--serve-seed" in argv:
        serve_seed([arg for arg in argv if arg != "--serve-seed"])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.embedder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short cells, about a minute")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=8, help="model batch of the service")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--model-workers",
        type=int,
        default=0,
        help="the service's EMBEDDER_MODEL_WORKERS (0: its default, min(2, "
        "cores), each with the cores shared out as torch threads)",
    )
    parser.add_argument("--seconds", type=float, default=None, help="measuring time per cell")
    parser.add_argument("--runtime", default="auto", help="the service's EMBEDDER_RUNTIME")
    parser.add_argument("--precision", default="fp32", help="the service's EMBEDDER_PRECISION")
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
    artifact_dir = with_runtime_files(artifact_dir)
    photos = load_photos(64)
    card = json.loads((artifact_dir / "model_card.json").read_text())
    print(
        f"embedder benchmark: {card['model_version']} ({kind}, {artifact_dir}), "
        f"{card['input_size']}px, {len(photos)} real 512x512 photos"
    )
    print(
        f"{cpu_name()}, torch {torch.__version__} with {args.torch_threads} threads; "
        f"service: model batch {args.batch_size}, max wait {args.max_wait_ms} ms; "
        f"{warmup_s:g} s warm-up + "
        f"{', '.join(f'{measure_s(level):g}' for level in levels)} s per cell"
    )
    print(f"before: {load_line()}", flush=True)

    import grpc

    from marketplace.embedder.v1 import embedder_pb2_grpc
    from services.embedder.engine import ImageModel

    cores = args.torch_threads
    raw_model = ImageModel.load(artifact_dir, runtime="torch")
    runtimes = load_runtimes(artifact_dir, cores)
    models = {"torch fp32": {layout: raw_model for layout in layouts(cores)}, **runtimes}

    def set_threads(threads: int) -> None:
        torch.set_num_threads(threads)

    # (e) first, on a quiet process: each runtime alone on a preprocessed model batch
    batch = torch.stack([raw_model.preprocess(data) for data in photos[: args.batch_size]])
    alone: dict[str, tuple[WindowCell, Layout]] = {}
    model_s = 3.0 if args.quick else 8.0
    for label, compiled in models.items():
        alone[label] = best_layout_cell(
            lambda layout: model_cell(compiled[layout], batch, layout, warmup_s, model_s),
            args.batch_size,
            cores,
            set_threads,
        )
        print(
            f"  (e) {label}: {alone[label][0].per_s:.1f} img/s, model alone at batch "
            f"{args.batch_size}, best layout {alone[label][1]} loops x threads "
            f"({load_line()})",
            flush=True,
        )
    raw, served, seeded = {}, {}, {}
    runs: dict[str, dict[int, WindowCell]] = {label: {} for label in runtimes}
    chosen: dict[str, dict[int, Layout]] = {label: {} for label in models}
    with tempfile.TemporaryDirectory(prefix="bench-embedder-") as tmp:
        # Both servers run (idle) for the whole benchmark so the three paths of one concurrency
        # are measured back to back, under the same background load.
        service = start_server(
            "embedder",
            {
                "EMBEDDER_ARTIFACT_DIR": str(artifact_dir),
                "EMBEDDER_BATCH_SIZE": str(args.batch_size),
                "EMBEDDER_MAX_WAIT_MS": str(args.max_wait_ms),
                "EMBEDDER_MODEL_WORKERS": str(args.model_workers),
                "EMBEDDER_RUNTIME": args.runtime,
                "EMBEDDER_PRECISION": args.precision,
                "LOG_LEVEL": "info",
            },
            Path(tmp),
        )
        seed = None
        try:
            seed = start_server(
                "seed",
                {},
                Path(tmp),
                module="benchmarks.embedder",
                args=[
                    "--serve-seed",
                    "--artifact-dir",
                    str(artifact_dir),
                    "--torch-threads",
                    str(args.torch_threads),
                ],
            )
            with (
                grpc.insecure_channel(service.address) as service_channel,
                grpc.insecure_channel(seed.address) as seed_channel,
            ):
                service_stub = embedder_pb2_grpc.EmbedderStub(service_channel)
                seed_stub = embedder_pb2_grpc.EmbedderStub(seed_channel)
                for level in levels:
                    seconds = measure_s(level)
                    for label, compiled in models.items():
                        cell, chosen[label][level] = best_layout_cell(
                            lambda layout: raw_cell(
                                compiled[layout], photos, level, args.batch_size, warmup_s, seconds, layout
                            ),
                            level,
                            cores,
                            set_threads,
                        )
                        (runs[label] if label in runs else raw)[level] = cell
                    set_threads(cores)
                    served[level] = server_cell(service_stub, photos, level, warmup_s, seconds)
                    seeded[level] = server_cell(seed_stub, photos, level, warmup_s, seconds)
                    columns = "".join(
                        f", {label} {runs[label][level].per_s:.1f} ({chosen[label][level]})"
                        for label in runtimes
                    )
                    print(
                        f"  c={level}: raw torch {raw[level].per_s:.1f} "
                        f"({chosen['torch fp32'][level]}){columns}, service "
                        f"{served[level].per_s:.1f}, seed "
                        f"{seeded[level].per_s:.1f} img/s ({load_line()})",
                        flush=True,
                    )
        finally:
            service.stop(30)
            service_log = service.log_path.read_text(errors="replace")
            if seed is not None:
                seed.stop(30)

    print("\nimages/s and per-image latency (ms); every path includes decode + preprocess")
    print(
        "(a) raw = in-process torch model, each cell in its best layout (loops x threads, "
        "in brackets above); (b) service = gRPC, 1 image/request, dynamic batching; (c) seed = "
        "gRPC, 1 image/request, batch-1 model call in the handler thread; (d) = (a) in another "
        "runtime"
    )
    columns = {
        "(a) torch": raw,
        **{f"(d) {label}": cells for label, cells in runs.items()},
        "(b) service": served,
        "(c) seed": seeded,
    }
    print_cells(columns, levels)
    # the targets are at fp32 or bf16: int8 columns are shown but not counted
    counted = {label: cells for label, cells in runs.items() if counts(label)}
    best = {
        level: max([raw[level]] + [cells[level] for cells in counted.values()], key=lambda cell: cell.per_s)
        for level in levels
    }
    best_label = {
        level: next((label for label, cells in counted.items() if cells[level] is best[level]), "torch")
        for level in levels
    }
    print(f"{'conc':>4} | fastest raw runtime | runtime/torch | service/fastest raw | service/seed")
    for level in levels:
        print(
            f"{level:>4} | {best_label[level]:>19} | {best[level].per_s / raw[level].per_s:>13.2f}"
            f" | {served[level].per_s / best[level].per_s:>19.2f} | "
            f"{served[level].per_s / seeded[level].per_s:>12.2f}"
        )
    print(f"service over the whole run: {service_setup(service_log)}")
    torch_alone = alone["torch fp32"][0].per_s
    print(
        f"(e) each runtime alone, model batch {args.batch_size}, preprocessed input: "
        + ", ".join(
            f"{label} {cell.per_s:.1f} img/s ({layout}, {cell.per_s / torch_alone:.2f}x torch)"
            for label, (cell, layout) in alone.items()
        )
    )
    best_alone = max(cell.per_s for label, (cell, _) in alone.items() if counts(label))

    print(f"after: {load_line()}")
    top = max(levels)
    b = served[top].per_s
    print(
        f"RESULT runtime_vs_torch={best[top].per_s / raw[top].per_s:.2f} "
        f"runtime_vs_torch_model={best_alone / torch_alone:.2f} "
        f"service_vs_raw={b / best[top].per_s:.2f} "
        f"service_vs_seed={b / seeded[top].per_s:.2f} images_per_s_c{top}={b:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
