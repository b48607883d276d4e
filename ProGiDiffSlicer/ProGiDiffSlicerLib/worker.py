"""One persistent worker thread that owns the engine (model loaded once, reused across
runs, freed on unload). Slicer's main thread submits jobs and polls them; the worker never
touches Qt or MRML. cuDNN/CUDA state is per thread, so keeping one thread keeps the
warm-up (SlicerNNInteractive measured 1.2 s vs 0.11 s per call)."""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

#: Below this much free GPU memory the run goes to the CPU, with a notice.
MIN_FREE_GPU_BYTES = 2 * 1024 ** 3


def choose_device(force_cpu: bool) -> tuple[str, str]:
    """(device, notice). The notice is shown in the module when we run on the CPU."""
    if force_cpu:
        return "cpu", "Running on the CPU (Force CPU is on): expect about a minute per run."
    try:
        import torch
    except ImportError:
        return "cpu", "PyTorch is not installed."
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        if free >= MIN_FREE_GPU_BYTES:
            return "cuda", ""
        return "cpu", (f"Running on the CPU: the GPU has only {free / 1024 ** 3:.1f} GB free "
                       f"(needs {MIN_FREE_GPU_BYTES / 1024 ** 3:.0f} GB). Close other GPU programs for speed.")
    return "cpu", "Running on the CPU: no CUDA GPU was found (install the CUDA build of PyTorch for speed)."


@dataclass
class SegmentRequest:
    array: np.ndarray           # voxels in KJI order (slicer.util.arrayFromVolume(...).copy())
    ijk_to_ras: np.ndarray      # 4x4
    prompt: str
    proposals: int = 8
    steps: int = 4  # progidiff.engine.DEFAULT_STEPS (not imported: the module must load before torch is installed)
    seed: int = 0
    modality: str = "auto"
    dicom_modality: str | None = None
    model_dir: str | None = None
    force_cpu: bool = False
    name: str = "volume"
    edited: np.ndarray | None = None   # re-sample around edits: the edited mask (KJI) ...
    keep: np.ndarray | None = None     # ... and the voxels to keep exactly
    strength: float = 0.6


@dataclass
class Job:
    request: SegmentRequest
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    stage: str = "queued"            # queued, loading, sampling, done, failed, cancelled
    progress: tuple[int, int] = (0, 0)
    result: object | None = None     # progidiff.engine.SegmentResult
    error: str | None = None
    notice: str = ""

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done_event.wait(timeout)

    @property
    def finished(self) -> bool:
        return self.done_event.is_set()


class SegmentationWorker:
    def __init__(self, engine_factory: Callable[[str | None, str], object] | None = None) -> None:
        self._factory = engine_factory
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._engine = None
        self._engine_key: tuple | None = None
        self.engine_loads = 0

    # -- main-thread API ------------------------------------------------------------------
    def submit(self, request: SegmentRequest) -> Job:
        job = Job(request)
        self._ensure_thread()
        self._queue.put(job)
        return job

    def unload(self) -> threading.Event:
        """Free the model (and GPU memory) on the worker thread."""
        ev = threading.Event()
        self._ensure_thread()
        self._queue.put(("unload", ev))
        return ev

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self._thread = None

    @property
    def model_loaded(self) -> bool:
        return self._engine is not None

    # -- worker thread ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="ProGiDiffWorker", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._free()
                return
            if isinstance(item, tuple) and item[0] == "unload":
                self._free()
                item[1].set()
                continue
            self._run(item)

    def _free(self) -> None:
        self._engine = None
        self._engine_key = None
        try:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _engine_for(self, model_dir: str | None, device: str):
        key = (model_dir, device)
        if self._engine is None or self._engine_key != key:
            self._free()
            if self._factory is None:
                from progidiff.engine import Engine

                self._engine = Engine(model_dir, device=device)
            else:
                self._engine = self._factory(model_dir, device)
            self._engine_key = key
            self.engine_loads += 1
        return self._engine

    def _run(self, job: Job) -> None:
        from progidiff.engine import SegmentOptions
        from progidiff.errors import Cancelled, ProGiDiffError
        from progidiff.volume import Scan, validate_image

        from .geometry import image_from_array

        req = job.request
        try:
            if job.cancel_event.is_set():
                raise Cancelled("Cancelled before it started.")
            device, job.notice = choose_device(req.force_cpu)
            if self._engine is None or self._engine_key != (req.model_dir, device):
                job.stage = "loading"
            engine = self._engine_for(req.model_dir, device)
            if job.cancel_event.is_set():
                raise Cancelled("Cancelled.")
            job.stage = "sampling"
            image = validate_image(image_from_array(req.array, req.ijk_to_ras), req.name)
            scan = Scan(image, req.name, req.dicom_modality)
            opts = SegmentOptions(proposals=req.proposals, steps=req.steps, seed=req.seed, modality=req.modality)

            def progress(stage: str, done: int, total: int) -> None:
                job.progress = (done, total)

            if req.edited is not None:
                job.result = engine.refine(scan, req.prompt, req.edited, req.keep, opts, strength=req.strength,
                                           progress=progress, cancel=job.cancel_event)
            else:
                job.result = engine.segment(scan, req.prompt, opts, progress=progress, cancel=job.cancel_event)
            job.stage = "done"
        except Cancelled as exc:
            job.stage, job.error = "cancelled", str(exc)
        except ProGiDiffError as exc:
            job.stage, job.error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - shown to the user, full trace in the log
            log.error("ProGiDiff worker failed:\n%s", traceback.format_exc())
            job.stage, job.error = "failed", f"Unexpected error: {exc} (details in the Python console)."
        finally:
            job.done_event.set()
