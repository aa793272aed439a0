"""Launch-config cache, capture fallback and warm-up (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

import stss_kernels
from stss_kernels._core import tuning
from stss_kernels.ops.tempered_kl.triton_backend import backward, forward


class FakeConfig:
    def __init__(self, block: int):
        self.kwargs, self.num_warps, self.num_stages = {"BLOCK": block}, 4, 2


class FakeKernel:
    """Records the BLOCK of every launch; a launch with BLOCK=b adds b to arguments['out']."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(out, BLOCK, num_warps, num_stages):
            self.launches.append(BLOCK)
            out += BLOCK

        return run


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend the kernels run on a GPU (not the interpreter); timing is a fake: config BLOCK=32 is fastest."""
    monkeypatch.setattr(tuning, "triton_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "capturing_or_tracing", lambda: False)
    import triton.testing

    def fake_do_bench(fn, warmup, rep):
        fn()
        return {16: 2.0, 32: 1.0, 64: 3.0}[kernel.launches[-1]]

    kernel = FakeKernel()
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return kernel


def test_tunes_once_per_shape_class_and_restores_outputs(on_gpu):
    tuned = tuning.TunedKernel("fake", on_gpu, [FakeConfig(16), FakeConfig(32), FakeConfig(64)], restore=("out",))
    out = torch.zeros(1)
    key = tuning.shape_class(tokens=3600, hw=150, channels=(768, 768), dtype=torch.bfloat16, masked=False)
    tuned(lambda blocks: (1,), key, {"out": out}, {})
    assert on_gpu.launches == [16, 32, 64, 32] and out.item() == 32  # three timed, restored, then the real launch
    same_class = tuning.shape_class(tokens=3000, hw=150, channels=(700, 768), dtype=torch.bfloat16, masked=False)
    assert same_class == key
    tuned(lambda blocks: (1,), same_class, {"out": out}, {})
    assert on_gpu.launches[-1] == 32 and len(on_gpu.launches) == 5
    assert tuning.shape_class(tokens=3600, hw=160, channels=(768, 768), dtype=torch.bfloat16, masked=False) != key


def test_capture_or_tracing_uses_the_default_config_without_timing(on_gpu, monkeypatch):
    monkeypatch.setattr(tuning, "capturing_or_tracing", lambda: True)
    tuned = tuning.TunedKernel("fake", on_gpu, [FakeConfig(16), FakeConfig(32), FakeConfig(64)], default=lambda k: 2)
    out = torch.zeros(1)
    tuned(lambda blocks: (1,), ("class",), {"out": out}, {})
    assert on_gpu.launches == [64] and not tuned.cache  # nothing timed, nothing cached
    monkeypatch.setattr(tuning, "capturing_or_tracing", lambda: False)
    tuned(lambda blocks: (1,), ("class",), {"out": out}, {})
    assert tuned.cache[("class",)].kwargs == {"BLOCK": 32}


def test_hopper_only_configs_are_not_timed_on_other_gpus(on_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    configs = [FakeConfig(16), tuning.hopper_only(FakeConfig(32)), FakeConfig(64)]
    tuned = tuning.TunedKernel("fake", on_gpu, configs)
    tuned(lambda blocks: (1,), ("class",), {"out": torch.zeros(1)}, {})
    assert on_gpu.launches == [16, 64, 16]  # 32 (fastest, but hopper-only) skipped on sm_80
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert tuning.runs_here(configs[1]) and tuning.runs_here(configs[0])


def test_autotune_off_by_environment(on_gpu, monkeypatch):
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    tuned = tuning.TunedKernel("fake", on_gpu, [FakeConfig(16), FakeConfig(32)])
    tuned(lambda blocks: (1,), ("class",), {"out": torch.zeros(1)}, {})
    assert on_gpu.launches == [16]


def test_capturing_or_tracing_is_true_inside_torch_compile():
    seen = []

    def probe(x):
        seen.append(tuning.capturing_or_tracing())
        return x + 1

    torch.compile(probe, backend="eager")(torch.zeros(2))
    assert seen and seen[0] is True and tuning.capturing_or_tracing() is False


def test_every_kernel_is_registered_with_its_config_list():
    names = {"tempered_kl.forward.narrow", "tempered_kl.forward.wide", "tempered_kl.feature_grad.column",
             "tempered_kl.feature_grad.row", "tempered_kl.similarity_grad", "tempered_kl.dual_product",
             "tempered_kl.row_product"}  # fmt: skip
    assert names <= set(tuning.REGISTRY)
    assert forward.FORWARD[True].configs and forward.FORWARD[False].configs
    assert backward.FEATURE_GRAD[False].restore == ("grad_ptr",) and backward.DUAL_PRODUCT.restore == ("grad_ptr",)


def test_warmup_runs_and_reports_tuned_classes():
    stss_kernels.clear_tuning_cache()
    tuned = stss_kernels.warmup([(1, 2, 7, 5, 6)], dtypes=(torch.float32,), mask_ratios=(None, 0.5), device="cpu")
    assert "tempered_kl.forward.narrow" in tuned
    assert any(key[-1] == (("masked", True),) for classes in tuned.values() for key in classes)
    with pytest.raises(ValueError, match="shapes"):
        stss_kernels.warmup([(1, 2, 7, 5)], device="cpu")


def test_warmup_needs_a_gpu_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(stss_kernels._warmup, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="device"):
        stss_kernels.warmup([(1, 2, 7, 5, 6)], device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_does_not_tune(monkeypatch):
    """An untuned shape class met during capture runs the default config; nothing is timed or cached."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4 * 150, 64, generator=generator).cuda().bfloat16()
    teacher = torch.randn(2, 4 * 150, 96, generator=generator).cuda().bfloat16()

    def loss():
        return stss_kernels.tempered_kl(student, teacher, frames=4, backend="triton")

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    eager = loss()  # compiles the default configs (no timing) outside the capture
    monkeypatch.delenv(tuning.AUTOTUNE_ENV)
    stss_kernels.clear_tuning_cache()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = loss()
    graph.replay()
    torch.cuda.synchronize()
    assert stss_kernels.tuned_configs() == {}
    torch.testing.assert_close(captured, eager)
