"""Inference runtimes for the image backbone: torch (the reference), ONNX Runtime and OpenVINO.

Why: on this project's CPUs torch's eager kernels reach a few percent of the peak; the same
network exported to ONNX runs several times faster in ONNX Runtime or OpenVINO. Every runtime
other than torch is accepted only after a load-time check against the torch reference on real
photos (``check_session``): the minimum cosine between embeddings and the agreement of the top
category must clear the bounds of ``CHECK_BOUNDS`` for the precision, or the runtime is refused
(an explicit setting) or passed over (``auto``).

A *session* here is one compiled model that maps a float32 batch (B, 3, H, W) to a tuple of float32
arrays with B rows each (the ONNX graph's outputs, in order). Sessions are safe to call from
several threads at once: each calling thread gets its own ONNX Runtime session or OpenVINO infer
request, so ``workers`` threads of ``threads`` cores each run side by side.

Nothing here knows about gRPC, the artefact layout or batching.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
RUNTIME_SETTINGS = ("auto",) + RUNTIMES
PRECISIONS = ("fp32", "bf16", "int8")
#: The ONNX opset the exports use: supported by every runtime version we pin and old enough to be
#: read by ONNX Runtime >= 1.14 and OpenVINO >= 2023.
ONNX_OPSET = 17


class RuntimeUnavailable(RuntimeError):
    """A runtime or precision cannot be used here (not installed, not supported by the CPU, no
    exported model, or failing the check); the message names the setting and what to do."""


@dataclass(frozen=True)
class CheckBounds:
    """The least a runtime must reach against the torch reference on the check photos.

    ``min_cosine``: the smallest cosine between a photo's embedding from the runtime and from
    torch; ``min_top1_agreement``: the share of photos whose top category is the same.
    """

    min_cosine: float
    min_top1_agreement: float


#: Why these bounds:
#: * fp32: the runtimes compute the same float32 network in another order of summation, which
#:   moves an embedding by ~1e-7 (measured: min cosine 0.9999999). 0.999 leaves three orders of
#:   magnitude for kernel differences and still catches any real error (a wrong layout, a wrong
#:   normalisation or a mis-fused layer gives cosines far below 0.99); the top category must
#:   never change.
#: * bf16: 8 bits of mantissa per operation; measured min cosine 0.9997 over real photos. The
#:   catalogue's nearest neighbours of a photo are typically 0.02-0.1 apart in cosine, so a
#:   0.995 bound (a shift of at most ~0.1 in euclidean distance between unit vectors, and in
#:   practice far less) keeps rankings except between near-ties; a few near-tie categories may
#:   flip, so 90% top-1 agreement.
#: * int8: post-training quantisation is coarser; 0.97 and 85% top-1 agreement, what a
#:   well-quantised CNN reaches (EfficientNet-Lite was designed for it: ReLU6, no squeeze-excite).
#:   On this project's AVX2 CPU the best recipe found (`common.model.quantize_int8`) reaches min
#:   cosine 0.89, mean 0.97, so int8 is refused there; benchmarks.accuracy reports what each
#:   precision costs on the test split.
CHECK_BOUNDS: dict[str, CheckBounds] = {
    "fp32": CheckBounds(0.999, 1.0),
    "bf16": CheckBounds(0.995, 0.9),
    "int8": CheckBounds(0.97, 0.85),
}


class Session(Protocol):
    """A compiled model: float32 batch in, the graph's outputs (float32, B rows each) out."""

    runtime: str
    precision: str

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]: ...


def runtime_versions() -> dict[str, str]:
    """The versions of every runtime package installed here (absent ones are left out)."""
    versions = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "unknown"))
        except Exception:  # not installed, or broken: the runtime is simply unavailable
            continue
    return versions


# --------------------------------------------------------------------------- torch


class TorchSession:
    """The reference: a torch module called on the batch, in float32 or with bf16 autocast."""

    runtime = "torch"

    def __init__(
        self,
        forward: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        *,
        precision: str = "fp32",
        channels_last: bool = True,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise RuntimeUnavailable(
                f"runtime torch has no {precision} precision (fp32 or bf16; "
                "int8 runs in onnxruntime or openvino)"
            )
        self.precision = precision
        self._forward = forward
        self._channels_last = channels_last

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
        tensor = torch.as_tensor(batch)
        if self._channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outputs = self._forward(tensor)
            else:
                outputs = self._forward(tensor)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return tuple(out.float().numpy() for out in outputs)


def _import_runtime(module: str):
    """The runtime's Python package, or RuntimeUnavailable saying how to install it."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise RuntimeUnavailable(
            f"runtime {module} is not installed here ({exc}); pip install {module}, or choose another runtime"
        ) from None


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxRuntimeSession:
    """ONNX Runtime's CPU provider; one InferenceSession per model worker with ``threads``
    intra-op threads each, so workers never queue on one session's thread pool."""

    runtime = "onnxruntime"

    def __init__(
        self, model_path: Path, *, precision: str = "fp32", threads: int = 1, workers: int = 1
    ) -> None:
        onnxruntime = _import_runtime("onnxruntime")
        if precision == "bf16":
            raise RuntimeUnavailable(
                "runtime onnxruntime has no bf16 precision on the CPU; use openvino for bf16, or fp32/int8"
            )
        self.precision = precision
        model = Path(model_path).read_bytes()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # threads of an idle pool sleep instead of spinning: cores stay free for the others
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # compiled now, one per worker: a bad file fails at load, and no request pays for it
        self._sessions = [
            onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            for _ in range(max(1, workers))
        ]
        self._input = self._sessions[0].get_inputs()[0].name
        self._assigned = itertools.count()
        self._local = threading.local()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        session = getattr(self._local, "session", None)
        if session is None:  # each calling thread keeps one session (sessions are thread-safe)
            session = self._sessions[next(self._assigned) % len(self._sessions)]
            self._local.session = session
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return tuple(session.run(None, {self._input: batch}))


# --------------------------------------------------------------------------- OpenVINO


def openvino_capabilities() -> list[str]:
    import openvino

    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoSession:
    """OpenVINO's CPU plugin; the model compiled once with ``workers`` streams of ``threads``
    threads each, one infer request per calling thread. bf16 is OpenVINO's inference precision
    hint, honoured only on CPUs with native bf16 (AVX-512 BF16 or AMX): elsewhere it is refused
    rather than silently run in f32."""

    runtime = "openvino"

    def __init__(
        self, model_path: Path, *, precision: str = "fp32", threads: int = 1, workers: int = 1
    ) -> None:
        openvino = _import_runtime("openvino")
        self.precision = precision
        core = openvino.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeUnavailable(
                "precision bf16 is not available in runtime openvino on this CPU (no native bf16: "
                f"OpenVINO's CPU capabilities are {', '.join(openvino_capabilities())}); use fp32"
            )
        config = {
            # int8 models carry their own quantised operations; the rest runs in f32
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "NUM_STREAMS": str(max(1, workers)),
            "INFERENCE_NUM_THREADS": str(max(1, workers) * max(1, threads)),
            "PERFORMANCE_HINT": "THROUGHPUT" if workers > 1 else "LATENCY",
        }
        model = core.read_model(str(model_path))
        self._compiled = core.compile_model(model, "CPU", config)
        self._local = threading.local()
        self._request()

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return request

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        request = self._request()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        request.infer({0: batch})
        return tuple(
            np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(self._compiled.outputs))
        )


def open_session(
    runtime: str, model_path: Path, *, precision: str = "fp32", threads: int = 1, workers: int = 1
) -> Session:
    """Compile ``model_path`` (ONNX) in ``runtime``; ``RuntimeUnavailable`` says why not."""
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(model_path, precision=precision, threads=threads, workers=workers)
    if runtime == "openvino":
        return OpenVinoSession(model_path, precision=precision, threads=threads, workers=workers)
    raise ValueError(f"no ONNX session for runtime {runtime!r}")


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class CheckResult:
    """How one runtime compares with the torch reference on the check photos."""

    runtime: str
    precision: str
    photos: int
    min_cosine: float
    top1_agreement: float
    bounds: CheckBounds
    #: seconds per photo of the runtime on the check batch (after a warm-up run)
    seconds_per_photo: float

    @property
    def passed(self) -> bool:
        return (
            self.min_cosine >= self.bounds.min_cosine
            and self.top1_agreement >= self.bounds.min_top1_agreement
        )

    def describe(self) -> str:
        return (
            f"runtime {self.runtime} precision {self.precision} on {self.photos} check photos: "
            f"min embedding cosine {self.min_cosine:.6f} (bound {self.bounds.min_cosine}), "
            f"top-1 agreement {self.top1_agreement:.1%} "
            f"(bound {self.bounds.min_top1_agreement:.0%})"
        )


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
    """(min cosine of the first outputs, top-1 agreement of the last outputs); with one output,
    top-1 is the nearest other check photo by embedding (what a search would rank first)."""
    ref, got = _unit(reference[0]), _unit(candidate[0])
    min_cosine = float((ref * got).sum(axis=1).min())
    if len(reference) > 1:
        agree = np.argmax(reference[-1], axis=1) == np.argmax(candidate[-1], axis=1)
    else:

        def nearest(unit: np.ndarray) -> np.ndarray:
            similarity = unit @ unit.T
            np.fill_diagonal(similarity, -np.inf)
            return similarity.argmax(axis=1)

        agree = nearest(ref) == nearest(got)
    return min_cosine, float(agree.mean())


def check_session(
    session: Session, reference: Sequence[np.ndarray], inputs: np.ndarray, bounds: CheckBounds | None = None
) -> CheckResult:
    """Run ``session`` on the check inputs (twice: warm-up, then timed) and compare it with the
    reference outputs torch gave for the same inputs."""
    bounds = bounds or CHECK_BOUNDS[session.precision]
    session.run(inputs)
    started = time.perf_counter()
    outputs = session.run(inputs)
    elapsed = time.perf_counter() - started
    min_cosine, agreement = compare(reference, outputs)
    return CheckResult(
        session.runtime,
        session.precision,
        int(inputs.shape[0]),
        min_cosine,
        agreement,
        bounds,
        elapsed / max(1, int(inputs.shape[0])),
    )


#: Timed runs of each candidate in ``auto``'s speed trial. The machine may be busy with other
#: work while a service loads; the candidates take turns, run by run, and each is judged by its
#: fastest run, so a burst of load slows one run of every candidate instead of deciding the
#: choice (one timed run each picked ONNX Runtime over a faster OpenVINO on a shared machine).
SPEED_TRIAL_ROUNDS = 3


def speed_trial(
    sessions: Sequence[Session], inputs: np.ndarray, rounds: int = SPEED_TRIAL_ROUNDS
) -> list[float]:
    """Seconds per photo of each session on ``inputs``: the fastest of ``rounds`` runs, the
    sessions taking turns (each is warmed up first)."""
    for session in sessions:
        session.run(inputs)
    best = [float("inf")] * len(sessions)
    for _ in range(max(1, rounds)):
        for i, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(inputs)
            best[i] = min(best[i], time.perf_counter() - started)
    return [seconds / max(1, int(inputs.shape[0])) for seconds in best]


# --------------------------------------------------------------------------- choosing


@dataclass
class Choice:
    """The session a setting resolved to, the checks that led there and what was passed over."""

    session: Session
    check: CheckResult | None  # None for torch fp32 (the reference itself)
    checks: list[CheckResult]
    passed_over: list[str]  # "runtime/precision: why" for each candidate refused
    #: auto's speed trial: seconds per photo of every candidate that passed, by "runtime/precision"
    speeds: dict[str, float] = field(default_factory=dict)


def choose_session(
    setting: str,
    precision: str,
    *,
    reference: Session,
    inputs: np.ndarray,
    open_candidate: Callable[[str, str], Session],
    names: tuple[str, str] = ("runtime", "precision"),
) -> Choice:
    """Resolve a runtime ``setting`` (auto or one of RUNTIMES) and ``precision`` to a session.

    ``reference`` is the torch fp32 session; ``inputs`` the preprocessed check photos;
    ``open_candidate(runtime, precision)`` compiles a session or raises ``RuntimeUnavailable``.
    An explicit setting that cannot be opened or fails the check raises ``RuntimeUnavailable``
    naming it. ``auto`` checks every runtime at ``precision`` and keeps the fastest that passes
    by a short speed trial on the check inputs (``speed_trial``); when none passes it serves
    torch fp32 and says why in ``passed_over``. ``names`` are the two
    settings as the user spells them (``EMBEDDER_RUNTIME``, ...), for the messages.
    """
    label = f"{names[0]}={setting} {names[1]}={precision}"
    if setting not in RUNTIME_SETTINGS:
        raise RuntimeUnavailable(f"unknown runtime {setting!r}; one of {', '.join(RUNTIME_SETTINGS)}")
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if setting == "torch" and precision == "fp32":
        return Choice(reference, None, [], [])
    if not len(inputs) and setting == "auto":
        return Choice(
            reference, None, [], ["no check photos to compare a runtime with torch on: serving torch fp32"]
        )
    if not len(inputs):
        raise RuntimeUnavailable(
            f"refusing {label}: it needs check photos to be compared with torch, and there are none"
        )
    expected = reference.run(inputs)
    candidates = [setting] if setting != "auto" else list(RUNTIMES)
    checks: list[CheckResult] = []
    passed: list[tuple[Session, CheckResult | None]] = []
    passed_over: list[str] = []
    for runtime in candidates:
        if runtime == "torch" and precision == "fp32":
            passed.append((reference, None))
            continue
        try:
            session = open_candidate(runtime, precision)
            result = check_session(session, expected, inputs)
        except RuntimeUnavailable as exc:
            if setting != "auto":
                raise RuntimeUnavailable(f"refusing {label}: {exc}") from None
            passed_over.append(f"{runtime}/{precision}: {exc}")
            continue
        except Exception as exc:  # a runtime that crashes on this model is not usable
            reason = f"runtime {runtime} precision {precision} failed: {type(exc).__name__}: {exc}"
            if setting != "auto":
                raise RuntimeUnavailable(f"refusing {label}: {reason}") from None
            passed_over.append(f"{runtime}/{precision}: {reason}")
            continue
        checks.append(result)
        if result.passed:
            passed.append((session, result))
        elif setting != "auto":
            raise RuntimeUnavailable(
                f"refusing {label}: it fails the load-time check against torch: {result.describe()}"
            )
        else:
            passed_over.append(f"{runtime}/{precision}: fails the check: {result.describe()}")
    if not passed:
        passed_over.append(f"no runtime passed at precision {precision}: serving torch fp32")
        return Choice(reference, None, checks, passed_over)
    if len(passed) == 1:
        session, result = passed[0]
        return Choice(session, result, checks, passed_over)
    seconds = speed_trial([session for session, _ in passed], inputs)
    speeds = {
        f"{session.runtime}/{session.precision}": per_photo
        for (session, _), per_photo in zip(passed, seconds)
    }
    session, result = passed[seconds.index(min(seconds))]
    return Choice(session, result, checks, passed_over, speeds)
