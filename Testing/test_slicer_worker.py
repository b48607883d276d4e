"""The module's worker thread against the real engine (tiny model trained on real CT)."""
import time

import numpy as np
import pytest
import SimpleITK as sitk

from ProGiDiffSlicerLib.geometry import ijk_to_ras_of
from ProGiDiffSlicerLib.state import State, StateMachine
from ProGiDiffSlicerLib.worker import SegmentationWorker, SegmentRequest, choose_device


@pytest.fixture(scope="module")
def volume(ct_crop):
    img = sitk.ReadImage(str(ct_crop))
    return sitk.GetArrayFromImage(img).copy(), ijk_to_ras_of(img)


def _request(volume, tiny_model, **kw):
    arr, m = volume
    return SegmentRequest(array=arr, ijk_to_ras=m, prompt=kw.pop("prompt", "liver"), model_dir=str(tiny_model),
                          force_cpu=True, **{"proposals": 2, "steps": 2, **kw})


def test_progress_result_and_model_reuse(volume, tiny_model):
    w = SegmentationWorker()
    try:
        job = w.submit(_request(volume, tiny_model))
        seen = []
        while not job.wait(0.01):
            seen.append(job.progress)
        assert job.stage == "done", job.error
        assert job.result.masks.shape == (2,) + volume[0].shape
        assert job.progress[0] == job.progress[1] > 0
        assert any(0 < d < t for d, t in seen if t)
        assert "CPU" in job.notice
        job2 = w.submit(_request(volume, tiny_model, seed=5))
        assert job2.wait(60) and job2.stage == "done"
        assert w.engine_loads == 1  # loaded once, reused
        assert w.unload().wait(10) and not w.model_loaded
        job3 = w.submit(_request(volume, tiny_model))
        assert job3.wait(60) and w.engine_loads == 2
    finally:
        w.shutdown()


def test_cancel_stops_quickly_and_returns_nothing(volume, tiny_model):
    w = SegmentationWorker()
    try:
        job = w.submit(_request(volume, tiny_model, proposals=16, steps=50))
        while job.progress[0] == 0 and not job.finished:
            time.sleep(0.01)
        t0 = time.time()
        job.cancel()
        assert job.wait(30)
        elapsed = time.time() - t0
        assert job.stage == "cancelled" and job.result is None
        assert elapsed < 5, elapsed  # typically ~0.1 s: the sampler checks between micro-batches
    finally:
        w.shutdown()


def test_failures_become_messages(volume, tiny_model):
    w = SegmentationWorker()
    try:
        job = w.submit(_request(volume, tiny_model, prompt="brain"))
        assert job.wait(60) and job.stage == "failed" and "closest" in job.error and "\n" not in job.error
        bad = SegmentRequest(array=np.zeros((1, 8, 8), np.float32), ijk_to_ras=np.eye(4), prompt="liver",
                             model_dir=str(tiny_model), force_cpu=True)
        job = w.submit(bad)
        assert job.wait(60) and job.stage == "failed" and "too small" in job.error
        job = w.submit(_request(volume, "/nonexistent/model"))
        assert job.wait(60) and job.stage == "failed" and "model" in job.error.lower()
    finally:
        w.shutdown()


def test_choose_device_on_cpu_machine():
    dev, notice = choose_device(force_cpu=True)
    assert dev == "cpu" and "Force CPU" in notice


def test_state_machine_drives_buttons():
    m = StateMachine()
    ui = m.ui()
    assert ui.segment_enabled and not ui.cancel_enabled and not ui.proposals_enabled
    ui = m.to(State.LOADING)
    assert not ui.segment_enabled and ui.cancel_enabled and ui.progress_visible
    ui = m.to(State.SAMPLING)
    ui = m.to(State.CANCELLING)
    assert not ui.cancel_enabled and not ui.segment_enabled
    ui = m.to(State.IDLE, "Cancelled")
    assert ui.segment_enabled and ui.status == "Cancelled"
    m.to(State.SAMPLING)
    ui = m.to(State.DONE)
    assert ui.proposals_enabled
    with pytest.raises(ValueError):
        StateMachine().to(State.DONE)
