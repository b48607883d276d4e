"""Sampler behaviour on a model trained on real data (the tiny fixture)."""
import threading

import numpy as np
import pytest
import torch

from progidiff.errors import Cancelled, InputError
from progidiff.sampling import sample_proposals


@pytest.fixture(scope="module")
def setup(tiny_engine):
    from progidiff.volume import context_slices

    rng = np.random.default_rng(0)
    vol = rng.random((6, 32, 32)).astype(np.float32)
    stack = context_slices(vol, 1)
    states = tiny_engine.text_states(tiny_engine.vocabulary["liver"])
    return tiny_engine.model, stack, states


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim"])
def test_same_seed_same_masks_different_seed_different_masks(setup, scheduler):
    model, stack, states = setup
    a = sample_proposals(model, stack, states, seeds=[3, 4], steps=3, scheduler=scheduler)
    b = sample_proposals(model, stack, states, seeds=[3, 4], steps=3, scheduler=scheduler)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])


def test_batching_does_not_change_the_result(setup, monkeypatch):
    # Exact in fp32; bf16 (used where the CPU has it) rounds differently per batch shape.
    monkeypatch.setenv("PROGIDIFF_CPU_BF16", "0")
    model, stack, states = setup
    a = sample_proposals(model, stack, states, seeds=[0, 1, 2], steps=2, batch_size=1)
    b = sample_proposals(model, stack, states, seeds=[0, 1, 2], steps=2, batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_noise_per_proposal_for_all_slices(setup, monkeypatch):
    """3D coherence: identical slices in one proposal give identical masks."""
    monkeypatch.setenv("PROGIDIFF_CPU_BF16", "0")  # exact comparison: fp32
    model, stack, states = setup
    same = np.repeat(stack[:1], 4, axis=0)
    p = sample_proposals(model, same, states, seeds=[7], steps=2)
    for s in range(1, 4):
        np.testing.assert_allclose(p[0, 0], p[0, s], atol=1e-5)


def test_progress_and_cancel(setup):
    model, stack, states = setup
    calls = []
    sample_proposals(model, stack, states, seeds=[0, 1], steps=2, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (2 * 2 * 6, 2 * 2 * 6) and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    ev = threading.Event()

    def cancel_after_first(d, t):
        ev.set()

    with pytest.raises(Cancelled):
        sample_proposals(model, stack, states, seeds=[0], steps=3, batch_size=2, progress=cancel_after_first, cancel=ev)


def test_keep_mask_is_kept_exactly(setup):
    model, stack, states = setup
    init = np.zeros((6, 32, 32), np.float32)
    init[:, 8:20, 8:20] = 1
    keep = np.zeros((6, 32, 32), bool)
    keep[:, 4:24, 4:24] = True
    p = sample_proposals(model, stack, states, seeds=[0, 1], steps=4, init_mask=init, strength=0.6, keep_mask=keep)
    assert ((p > 0.5) == (init > 0.5))[:, keep].all()


def test_invalid_arguments(setup):
    model, stack, states = setup
    with pytest.raises(InputError):
        sample_proposals(model, stack, states, seeds=[0], steps=0)
    with pytest.raises(InputError):
        sample_proposals(model, stack, states, seeds=[], steps=2)
    with pytest.raises(InputError):
        sample_proposals(model, stack, states, seeds=[0], steps=2, scheduler="euler-magic")


def test_one_default_step_count_everywhere():
    from ProGiDiffSlicerLib.worker import SegmentRequest

    from progidiff import cli, engine

    assert cli.DEFAULT_STEPS == engine.DEFAULT_STEPS == engine.SegmentOptions().steps
    assert SegmentRequest.__dataclass_fields__["steps"].default == engine.DEFAULT_STEPS


def test_cpu_reduced_precision_can_be_switched_off(monkeypatch):
    from progidiff.sampling import autocast_dtype

    assert autocast_dtype(torch.device("cpu")) in (None, torch.bfloat16)
    monkeypatch.setenv("PROGIDIFF_CPU_BF16", "0")
    assert autocast_dtype(torch.device("cpu")) is None


def test_bf16_and_fp32_sampling_agree(setup, monkeypatch):
    """Where the CPU runs bf16 natively the sampler uses it; the masks must match fp32's."""
    from progidiff.sampling import autocast_dtype

    model, stack, states = setup
    if autocast_dtype(torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bf16; the sampler runs fp32 only")
    a = sample_proposals(model, stack, states, seeds=[0, 1], steps=2) > 0.5
    monkeypatch.setenv("PROGIDIFF_CPU_BF16", "0")
    b = sample_proposals(model, stack, states, seeds=[0, 1], steps=2) > 0.5
    assert (a != b).mean() < 0.01
