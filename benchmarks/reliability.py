"""The reliability suite at a larger size: bad input, bounded load and faults on the real stack.

    python -m benchmarks.reliability            # a few minutes
    python -m benchmarks.reliability --quick    # about a minute

Runs the functions of `tests/reliability/suite.py` (the same ones the default test run uses at a
small size) against the embedder (the test artefact: pretrained EfficientNet-Lite0, seeded head),
N indexer shards (default 2) and the gateway, each a subprocess on a fixed loopback port:

The embedder's text model is on when it loads (off with --quick: it costs several seconds at
each embedder start, and the fault part restarts the embedder).

* fuzz    every RPC of every service gets random bytes, truncated / oversized / bomb images,
          wrong vector sizes, NaN/inf, empty batches, huge k, unknown ids and filter fields; each
          must get its precise status and a normal request right after must succeed;
* load    a fixed number of requests (searches, reads, AddListing / RemoveListing) at a fixed
          concurrency to loopback; none may fail; RSS of every service before / after / peak;
* faults  while a bounded load runs, SIGKILL and restart the embedder, each indexer shard (the
          full run) or the first (--quick), and the gateway; the gateway must answer UNAVAILABLE
          within the deadline during an outage and fully after; no acknowledged write may be lost.

Only 127.0.0.1 is contacted; every loop is bounded by a request count and a time limit. The last
line is ``RESULT sent=<requests> failed=<failed> bad_inputs=<tried> lost_writes=<lost>``; the exit
status is 1 when anything failed or a write was lost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common.artifact import CARD_FILE
from common.config import REPO_ROOT

ARTIFACT_DIRS = (
    REPO_ROOT / "build" / "bench" / "embedder-test-artifact",
    REPO_ROOT / "build" / "bench" / "gateway-test-artifact",
    REPO_ROOT / "build" / "bench" / "reliability-test-artifact",
)


def test_artifact() -> Path:
    """The test artefact, exported once under build/bench (reused when already there)."""
    from tests.support.artifacts import make_test_artifact

    for directory in ARTIFACT_DIRS:
        if (directory / CARD_FILE).is_file():
            return make_test_artifact(directory)
    return make_test_artifact(ARTIFACT_DIRS[-1])


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reliability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--requests", type=int, default=None, help="load requests (2000; quick 240)")
    parser.add_argument("--concurrency", type=int, default=16, help="load concurrency")
    parser.add_argument(
        "--fuzz-rounds", type=int, default=None, help="random-bytes requests per RPC (10; quick 1)"
    )
    parser.add_argument("--shards", type=int, default=2, help="indexer shards")
    parser.add_argument(
        "--text-model",
        choices=["auto", "on", "off"],
        default=None,
        help="EMBEDDER_TEXT_MODEL (auto; quick: off, which saves several seconds at each embedder start)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="keep logs and data here (default: a temporary folder, removed)",
    )
    args = parser.parse_args(argv)
    requests = args.requests or (240 if args.quick else 2000)
    rounds = args.fuzz_rounds if args.fuzz_rounds is not None else (1 if args.quick else 10)
    text_model = args.text_model or ("off" if args.quick else "auto")

    from benchmarks._timing import print_table
    from tests.reliability import suite

    started = time.monotonic()
    artifact = test_artifact()
    print(
        f"reliability: {args.shards} indexer shard(s), load {requests} requests at concurrency "
        f"{args.concurrency}, {rounds} random round(s) per RPC, text model {text_model}; "
        f"{load_line()}",
        flush=True,
    )
    root = args.run_dir or Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    stack = suite.Stack.start(
        root,
        artifact,
        shards=args.shards,
        bootstrap_listings=12,
        photos=16 if args.quick else 48,
        text_model=text_model,
    )
    fuzz = load = faults = None
    try:
        print(f"stack up in {time.monotonic() - started:.1f}s (logs in {root / 'logs'})", flush=True)
        fuzz = suite.run_fuzz(stack, random_rounds=rounds, huge_messages=not args.quick)
        print(suite.describe_fuzz(fuzz), flush=True)
        load = suite.run_load(
            stack, requests=requests, concurrency=args.concurrency, max_seconds=120 if args.quick else 900
        )
        print(suite.describe_load(load), flush=True)
        services = (
            ["embedder", "indexer-0", "gateway"]
            if args.quick
            else ["embedder", *stack.indexer_keys, "gateway"]
        )
        faults = suite.run_faults(
            stack,
            services=services,
            concurrency=4,
            max_requests=2000 if args.quick else 20000,
            max_seconds=180 if args.quick else 900,
            outage_s=0.5 if args.quick else 3.0,
        )
        print(suite.describe_faults(faults), flush=True)
    finally:
        codes = stack.close()
        if (
            args.run_dir is None
            and fuzz
            and load
            and faults
            and not suite.figures(fuzz, load, faults)["failed"]
        ):
            shutil.rmtree(root, ignore_errors=True)
    values = suite.figures(fuzz, load, faults)
    problems = [
        *fuzz.imprecise,
        *fuzz.followups_failed,
        *(f"load: {k} x{v}" for k, v in load.failures.items()),
        *faults.problems,
        *(f"faults: {k} x{v}" for k, v in faults.unexpected.items()),
        *load.lost,
        *faults.lost,
    ]
    if any(codes.values()):
        problems.append(f"unclean shutdown on SIGTERM: {codes}")

    rows = [
        {"part": "fuzz", "figure": "bad inputs tried", "value": fuzz.bad_inputs},
        {"part": "fuzz", "figure": "precise status", "value": fuzz.precise},
        {"part": "fuzz", "figure": "normal request after: ok", "value": fuzz.followups_ok},
        {"part": "load", "figure": "requests sent", "value": load.sent},
        {"part": "load", "figure": "failed", "value": load.failed},
        {"part": "load", "figure": "requests/s", "value": round(load.rps, 1)},
        {
            "part": "load",
            "figure": "p50 / p99 ms",
            "value": f"{load.percentile(50):.0f} / {load.percentile(99):.0f}",
        },
        {
            "part": "load",
            "figure": "acked writes / lost",
            "value": f"{load.acked_writes} / {load.lost_writes}",
        },
        *(
            {
                "part": "load",
                "figure": f"RSS {key} before/half-way/after/peak",
                "value": " / ".join(
                    suite.mib(rss.get(key, 0))
                    for rss in (load.rss_before, load.rss_mid, load.rss_after, load.rss_peak)
                ),
            }
            for key in load.rss_before
        ),
        {"part": "faults", "figure": "requests sent", "value": faults.sent},
        {
            "part": "faults",
            "figure": "ok / UNAVAILABLE during outages",
            "value": f"{faults.ok} / {faults.unavailable}",
        },
        {"part": "faults", "figure": "failed otherwise", "value": faults.failed},
        {
            "part": "faults",
            "figure": "acked writes / lost",
            "value": f"{faults.acked_writes} / {faults.lost_writes}",
        },
        *(
            {
                "part": "faults",
                "figure": f"{o.service} killed: slowest probe / restart / recovered",
                "value": f"{max((p.seconds for p in o.probes), default=0):.2f}s / {o.restart_s:.1f}s / "
                f"{o.recovered_s:.1f}s",
            }
            for o in faults.outages
        ),
    ]
    print()
    print_table(
        [{"figure": f"{row['part']:6s} {row['figure']}", "value": row["value"]} for row in rows],
        ["figure", "value"],
    )
    for problem in problems[:30]:
        print(f"PROBLEM {problem}")
    print(f"total {time.monotonic() - started:.0f}s; {load_line()}")
    print(suite.result_line(values), flush=True)
    return 1 if problems or values["failed"] or values["lost_writes"] else 0


if __name__ == "__main__":
    sys.exit(main())
