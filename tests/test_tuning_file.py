"""STSS_TUNING_FILE: tuned launch configs shared by processes (no GPU needed: the device and timing are faked)."""

from __future__ import annotations

import json

import pytest
import torch

from stss_kernels._core import tuning


class FakeConfig:
    def __init__(self, block: int, num_warps: int = 4):
        self.kwargs, self.num_warps, self.num_stages = {"BLOCK": block}, num_warps, 2


class FakeKernel:
    """Records the BLOCK of every launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(BLOCK, num_warps, num_stages):
            self.launches.append(BLOCK)

        return run


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU named 'Fake GPU' (sm_90) where config BLOCK=32 times fastest; returns the kernel's launch log."""
    monkeypatch.setattr(tuning, "triton_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "capturing_or_tracing", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    import triton.testing

    kernel = FakeKernel()

    def fake_do_bench(fn, warmup, rep):
        fn()
        return {16: 2.0, 32: 1.0, 64: 3.0}[kernel.launches[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return kernel


def _tuned(kernel, configs=(16, 32, 64)):
    return tuning.TunedKernel("fake", kernel, [FakeConfig(block) for block in configs])


KEY = tuning.shape_class(tokens=3600, hw=150, channels=(768, 768), dtype=torch.bfloat16, masked=False)


def test_a_choice_is_stored_and_reused_by_a_later_process_without_timing(gpu, tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(path))
    _tuned(gpu)(lambda kwargs: (1,), KEY, {}, {})
    assert gpu.launches == [16, 32, 64, 32]  # three timed, then the real launch with the fastest
    stored = json.loads(path.read_text())["devices"]["Fake GPU sm_90"]["fake"][repr(KEY)]
    assert stored == {"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 2}

    gpu.launches.clear()
    fresh = _tuned(gpu)  # a new process: an empty in-memory cache
    fresh(lambda kwargs: (1,), KEY, {}, {})
    assert gpu.launches == [32] and fresh.cache[KEY].kwargs == {"BLOCK": 32}


def test_choices_of_other_kernels_and_devices_are_kept(gpu, tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    other = {"devices": {"Other GPU sm_80": {"fake": {repr(KEY): {"kwargs": {"BLOCK": 64}, "num_warps": 4,
                                                                   "num_stages": 2}}}}}  # fmt: skip
    path.write_text(json.dumps(other))
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(path))
    _tuned(gpu)(lambda kwargs: (1,), KEY, {}, {})
    assert gpu.launches == [16, 32, 64, 32]  # the other GPU's choice is not used here
    devices = json.loads(path.read_text())["devices"]
    assert devices["Other GPU sm_80"] == other["devices"]["Other GPU sm_80"]
    assert devices["Fake GPU sm_90"]["fake"][repr(KEY)]["kwargs"] == {"BLOCK": 32}


def test_a_stored_config_no_longer_among_the_candidates_is_tuned_again(gpu, tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(path))
    stale = {"kwargs": {"BLOCK": 128}, "num_warps": 4, "num_stages": 2}  # a candidate of an earlier list
    path.write_text(json.dumps({"devices": {"Fake GPU sm_90": {"fake": {repr(KEY): stale}}}}))
    _tuned(gpu)(lambda kwargs: (1,), KEY, {}, {})
    assert gpu.launches == [16, 32, 64, 32]
    assert json.loads(path.read_text())["devices"]["Fake GPU sm_90"]["fake"][repr(KEY)]["kwargs"] == {"BLOCK": 32}


def test_a_stored_config_serves_where_tuning_is_off(gpu, tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    record = {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2}
    path.write_text(json.dumps({"devices": {"Fake GPU sm_90": {"fake": {repr(KEY): record}}}}))
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(path))
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    _tuned(gpu)(lambda kwargs: (1,), KEY, {}, {})
    assert gpu.launches == [64]


def test_a_broken_file_is_named_and_left_as_it_is(gpu, tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(path))
    with pytest.raises(ValueError, match="STSS_TUNING_FILE"):
        _tuned(gpu)(lambda kwargs: (1,), KEY, {}, {})
    assert path.read_text() == "{not json" and gpu.launches == []


def test_without_the_variable_nothing_is_written(gpu, tmp_path, monkeypatch):
    monkeypatch.delenv(tuning.TUNING_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    _tuned(gpu)(lambda kwargs: (1,), KEY, {}, {})
    assert gpu.launches == [16, 32, 64, 32] and list(tmp_path.iterdir()) == []
