"""tempered_kl as torch.library custom ops: the registrations pass opcheck, torch.compile(fullgraph=True)
matches eager with and without a mask, CUDA graphs capture the op, and the Triton path never syncs the host."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from helpers import features

import stss_kernels  # noqa: F401  (registers the custom ops)
from stss_kernels import tempered_kl


def _triton_backend_importable() -> bool:
    try:
        return hasattr(importlib.import_module("stss_kernels.ops.tempered_kl.triton_backend"), "tempered_kl_triton")
    except ImportError:
        return False


def _triton_runs_here() -> bool:
    from stss_kernels._core.backends import triton_available, triton_interpreting

    return _triton_backend_importable() and triton_available() and (torch.cuda.is_available() or triton_interpreting())


TRITON = pytest.param("triton", marks=pytest.mark.skipif(not _triton_runs_here(), reason="Triton cannot run here"))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (2, 3, 7, 5, 12)  # batch, frames, hw, student channels, teacher channels
TAUS = dict(tau_student=0.1, tau_teacher=0.15)


def _mask(kind, batch, num_tokens, device=DEVICE):
    gen = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    keep = torch.rand(batch, num_tokens, generator=gen) < 0.5
    if kind == "bool":
        return keep.to(device)
    return (torch.rand(batch, num_tokens, generator=gen) * 2 * keep).to(device)


def _loss_and_grads(fn, student, teacher, *extra):
    student = student.detach().requires_grad_()
    teacher = teacher.detach().requires_grad_()
    loss = fn(student, teacher, *extra)
    return (loss.detach(), *torch.autograd.grad(loss, (student, teacher)))


# --- the registrations -------------------------------------------------------------------------------------


def _op_cases():
    """(backend, masked)."""
    yield from (pytest.param("torch", masked, id=f"torch-{masked}") for masked in ("unmasked", "masked"))
    yield from (pytest.param("triton", masked, marks=TRITON.marks, id=f"triton-{masked}")
                for masked in ("unmasked", "masked"))  # fmt: skip


def _forward_op_and_args(backend, masked):
    from stss_kernels._core.normalize import l2_normalize

    batch, frames, hw, cs, ct = SHAPE
    student, teacher = (l2_normalize(x) for x in features(*SHAPE, device=DEVICE))
    weight = _mask("float", batch, frames * hw) if masked == "masked" else None
    args = (student.requires_grad_(), teacher.requires_grad_(), frames, 0.1, 0.15, weight)
    if backend == "torch":
        return torch.ops.stss_kernels.tempered_kl_torch.default, (*args, 8)
    return torch.ops.stss_kernels.tempered_kl_triton.default, args


@pytest.mark.parametrize("backend,masked", _op_cases())
def test_forward_op_passes_opcheck(backend, masked):
    op, args = _forward_op_and_args(backend, masked)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,masked", _op_cases())
def test_backward_op_passes_opcheck(backend, masked):
    op, args = _forward_op_and_args(backend, masked)
    outputs = op(*args)
    backward = getattr(torch.ops.stss_kernels, f"tempered_kl_{backend}_backward").default
    grad = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3)).to(outputs[0])
    inputs = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
    residuals = [x.detach() for x in outputs[1:]]
    for needs in ((True, True), (True, False)):
        torch.library.opcheck(
            backward, (grad, *inputs, *residuals, *needs), test_utils=("test_schema", "test_faketensor")
        )


_FRESH_PROCESS = """
import sys, torch, stss_kernels
assert "triton" not in sys.modules, "import stss_kernels imported Triton"
assert hasattr(torch.ops.stss_kernels, "tempered_kl_triton") and hasattr(torch.ops.stss_kernels, "tempered_kl_torch")
fn = lambda s, t: stss_kernels.tempered_kl(s, t, frames=2, backend="torch")
s, t = torch.randn(1, 6, 3), torch.randn(1, 6, 4)
torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(s, t), fn(s, t))
print("ok")
"""


def test_fresh_import_registers_the_ops_without_triton_and_compiles_first():
    """In a fresh process: `import stss_kernels` registers both custom ops without importing Triton, and the
    very first call of the op can be a fullgraph compile (no backend module imported inside the trace)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-c", _FRESH_PROCESS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# --- torch.compile ----------------------------------------------------------------------------------------


def _compile_cases():
    """(backend, mask kind)."""
    for backend in ("reference", "torch"):
        yield from (pytest.param(backend, kind, id=f"{backend}-{kind}") for kind in ("none", "bool", "float"))
    for kind in ("none", "bool", "float"):
        yield pytest.param("triton", kind, marks=TRITON.marks, id=f"triton-{kind}")


@pytest.mark.parametrize("backend,mask_kind", _compile_cases())
def test_compile_fullgraph_matches_eager(backend, mask_kind, monkeypatch):
    """fullgraph=True (no graph break anywhere, the mask path included), AOT autograd through the custom ops'
    fake and autograd registrations; one compilation serves a second call with other values."""
    torch._dynamo.reset()
    batch, frames, hw, cs, ct = SHAPE
    mask = _mask(mask_kind, batch, frames * hw)

    def loss_fn(student, teacher, mask):
        return tempered_kl(student, teacher, frames=frames, query_mask=mask, backend=backend, **TAUS)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for seed in (0, 1):
        student, teacher = features(*SHAPE, seed=seed, device=DEVICE)
        expected = _loss_and_grads(loss_fn, student, teacher, mask)
        actual = _loss_and_grads(compiled, student, teacher, mask)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


def test_compile_fullgraph_per_query_and_weight_gradient():
    """reduction="none" and a float mask that requires grad (every row computed), compiled with fullgraph."""
    torch._dynamo.reset()
    batch, frames, hw, cs, ct = SHAPE
    student, teacher = features(*SHAPE, seed=4, device=DEVICE)
    weight = _mask("float", batch, frames * hw)

    def loss_fn(student, teacher, weight):
        rows = tempered_kl(student, teacher, frames=frames, query_mask=weight, reduction="none", backend="torch")
        return (rows * torch.arange(rows.shape[1], device=rows.device)).sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        s, w = student.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(s, teacher, w)
        results.append((loss.detach(), *torch.autograd.grad(loss, (s, w))))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    assert (results[0][2][weight == 0] != 0).any()


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    """The default backend (inductor generates code around the opaque custom op)."""
    torch._dynamo.reset()
    batch, frames, hw, cs, ct = SHAPE
    mask = _mask("bool", batch, frames * hw)

    def loss_fn(student, teacher):
        return tempered_kl(student, teacher, frames=frames, query_mask=mask, backend="torch", **TAUS)

    student, teacher = features(*SHAPE, seed=5, device=DEVICE)
    expected = _loss_and_grads(loss_fn, student, teacher)
    actual = _loss_and_grads(torch.compile(loss_fn, fullgraph=True), student, teacher)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# --- host syncs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_paths_without_host_sync_match(backend, monkeypatch):
    """Where a host sync is not allowed (CUDA graph capture), the torch backend computes every row instead of
    finding the kept ones with nonzero (the Triton wide backward, in several chunks, never reads the kept
    counts on the host): same values and gradients, the dropped rows still passing none."""
    from stss_kernels._core import chunking

    batch, frames, hw, cs, ct = SHAPE
    student, teacher = features(*SHAPE, seed=10, device=DEVICE)
    weight = _mask("float", batch, frames * hw)
    upstream = torch.randn(batch, frames * hw, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    kl_fn = getattr(stss_kernels, f"tempered_kl_{backend}")
    # The backend itself, with an upstream gradient on the dropped rows too (the op's weighting would zero it).
    fn = lambda s, t: (kl_fn(s, t, frames, 0.1, 0.15, weight) * upstream).sum()
    if backend == "triton":
        from stss_kernels.ops.tempered_kl.triton_backend import forward

        monkeypatch.setattr(forward, "NARROW_CHANNELS", 0)  # the wide (chunked) backward
        monkeypatch.setattr(chunking, "CHUNK_BUDGET_BYTES", 4 * 21 * 8 * 2)  # several chunks per video
    expected = _loss_and_grads(fn, student, teacher)
    monkeypatch.setattr(chunking, "host_sync_allowed", lambda tensor: False)
    actual = _loss_and_grads(fn, student, teacher)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# --- CUDA graphs and host syncs (GPU only) ----------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_cuda_graph_captures_forward_and_backward(backend, mask_kind):
    """Capture forward + backward once (after a warm-up that tunes the kernels), replay on new inputs."""
    batch, frames, hw, cs, ct = 2, 3, 50, 40, 24
    student, teacher = features(batch, frames, hw, cs, ct, device="cuda", seed=7)
    mask = _mask(mask_kind, batch, frames * hw, device="cuda")
    static_s = student.clone().requires_grad_()
    static_t = teacher.clone()

    def step():
        static_s.grad = None
        loss = tempered_kl(static_s, static_t, frames=frames, query_mask=mask, backend=backend, **TAUS)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_s.grad = None
    with torch.cuda.graph(graph):
        static_loss = tempered_kl(static_s, static_t, frames=frames, query_mask=mask, backend=backend, **TAUS)
        static_loss.backward()
    new_s, new_t = features(batch, frames, hw, cs, ct, device="cuda", seed=8)
    with torch.no_grad():
        static_s.copy_(new_s)
        static_t.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    expected = _loss_and_grads(
        lambda s, t: tempered_kl(s, t, frames=frames, query_mask=mask, backend=backend, **TAUS), new_s, new_t
    )
    torch.testing.assert_close(static_loss.detach(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_s.grad, expected[1], rtol=1e-4, atol=1e-6)


@CUDA
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_triton_forward_and_backward_do_not_sync_the_host(mask_kind):
    batch, frames, hw, cs, ct = 2, 3, 50, 40, 24
    student, teacher = features(batch, frames, hw, cs, ct, device="cuda", seed=9)
    student.requires_grad_()
    mask = _mask(mask_kind, batch, frames * hw, device="cuda")
    run = lambda: tempered_kl(student, teacher, frames=frames, query_mask=mask, backend="triton").backward()
    run()  # tunes the kernels (autotuning syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
