"""Public op `stss_kernels.relation_distance`: every backend against an fp64 reference, each variant, masks,
reductions, dtypes, input validation, the RelationDistance module, and VideoREPA's TRD formulas."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REFERENCE_TOLERANCE,
    assert_close_to_truth,
    assert_no_worse_than_reference,
    features,
    query_mask,
    relation_distance_truth,
    truth_value_and_grads,
    value_and_grads,
)

import stss_kernels
from stss_kernels import RelationDistance, relation_distance
from stss_kernels._core.backends import triton_available

VARIANTS = ("full", "spatial", "temporal")
# Student and teacher share a component of this rank, so S and T are correlated and |S - T| straddles the margin.
SHARED_RANK = 3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _triton_backend_importable() -> bool:
    try:
        module = importlib.import_module("stss_kernels.ops.relation_distance.triton_backend")
    except ImportError:
        return False
    return hasattr(module, "relation_distance_triton")


TRITON = pytest.param(
    "triton", marks=pytest.mark.skipif(not _triton_backend_importable(), reason="the Triton backend is missing")
)
BACKENDS = ["reference", "torch", TRITON]

# (batch, frames, hw, student channels, teacher channels): ragged against the interpreter's 16 x 16 tiles and
# 32-channel chunks (a frame spanning two key tiles, 37 channels in two chunks), never powers of two.
SHAPES = {
    "ragged": (2, 3, 7, 5, 12),
    "wide_frames": (2, 2, 19, 37, 9),
}


def _gaps(student, teacher, normalize=True):
    """Every |S_ij - T_ij| in fp64 (all pairs of every video)."""
    s, t = student.double().flatten(1, -2), teacher.double().flatten(1, -2)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    return (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).abs().flatten()


def _margin_between_pairs(student, teacher, normalize=True, near=0.1, clearance=1e-4):
    """A margin near `near` that no |S_ij - T_ij| comes within `clearance` of (the loss has a kink there, where
    rounding could flip a pair in or out), with many pairs on each side."""
    gaps = _gaps(student, teacher, normalize).sort().values
    window = gaps[(gaps > 0.4 * near) & (gaps < 2.5 * near)]
    assert len(window) > 1, "no pair near the margin: degenerate test input"
    widths = window[1:] - window[:-1]
    best = int(widths.argmax())
    assert widths[best] > 2 * clearance, "no clear margin near the target"
    margin = float((window[best] + window[best + 1]) / 2)
    assert (gaps < margin).sum() > 10 and (gaps > margin).sum() > 10, "margin does not split the pairs"
    return margin


def _truth(student, teacher, frames, margin, variant, weight=None, normalize=True, reduction="none"):
    """Value and gradients of the float64 truth (tests/helpers.py)."""
    return truth_value_and_grads(
        relation_distance_truth,
        student,
        teacher,
        frames,
        margin,
        variant,
        weight=weight,
        normalize=normalize,
        reduction=reduction,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_fp64_truth(backend, shape, normalize, variant):
    batch, frames, hw, cs, ct = shape
    student, teacher = features(*shape, scale=1.0 if normalize else 0.25, shared_rank=SHARED_RANK)
    margin = _margin_between_pairs(student, teacher, normalize)
    kwargs = dict(frames=frames, margin=margin, variant=variant, normalize=normalize)
    actual = value_and_grads(
        lambda s, t: relation_distance(s, t, reduction="none", backend=backend, **kwargs), student, teacher
    )
    truth = _truth(student, teacher, frames, margin, variant, normalize=normalize)
    assert actual[0].dtype == torch.float32 and actual[0].shape == (batch, frames * hw)
    assert truth[0].abs().max() > 0.05 and (truth[0] > 0).all(), "degenerate test input"
    assert_close_to_truth(actual, truth)


def _mask_cases():
    """Every mask, reduction and variant on reference and torch; Triton (slow under the interpreter) with "mean"
    everywhere and "none" on the non-trivial masks: the reduction is backend-independent code."""
    for variant in VARIANTS:
        for mask_kind in ("none", "bool", "float", "empty", "full"):
            for reduction in ("none", "sum", "mean"):
                yield from (pytest.param(b, mask_kind, reduction, variant) for b in ("reference", "torch"))
                if reduction == "mean" or (reduction == "none" and mask_kind in ("bool", "float")):
                    yield pytest.param(*TRITON.values, mask_kind, reduction, variant, marks=TRITON.marks)


@pytest.mark.parametrize("backend,mask_kind,reduction,variant", _mask_cases())
def test_masks_and_reductions(backend, mask_kind, reduction, variant):
    batch, frames, hw, cs, ct = SHAPES["ragged"]
    student, teacher = features(batch, frames, hw, cs, ct, seed=3, shared_rank=SHARED_RANK)
    margin = _margin_between_pairs(student, teacher)
    mask = query_mask(mask_kind, batch, frames * hw)
    kwargs = dict(frames=frames, margin=margin, variant=variant, query_mask=mask)
    actual = value_and_grads(
        lambda s, t: relation_distance(s, t, reduction=reduction, backend=backend, **kwargs), student, teacher
    )
    truth = _truth(student, teacher, frames, margin, variant, mask, reduction=reduction)
    assert all(x.isfinite().all() for x in actual)
    assert_close_to_truth(actual, truth)
    if mask_kind == "empty":
        assert all((x == 0).all() for x in actual)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_mean_is_videorepas_trd(backend):
    """VideoREPA's released formulas (finetune/models/cogvideox_t2v_align/lora_trainer.py), transcribed."""
    batch, frames, height, width, channels = 2, 3, 2, 3, 6
    student, teacher = features(batch, frames, height * width, channels, channels, seed=12, shared_rank=SHARED_RANK)
    video = lambda x: x.view(batch, frames, height * width, channels)
    a, b = F.normalize(video(student), dim=-1), F.normalize(video(teacher), dim=-1)
    margin = _margin_between_pairs(student, teacher)
    full_s, full_t = (x.flatten(1, 2) @ x.flatten(1, 2).transpose(1, 2) for x in (a, b))
    frame_s, frame_t = (x.flatten(0, 1) @ x.flatten(0, 1).transpose(1, 2) for x in (a, b))
    full = F.relu((full_s - full_t).abs() - margin)
    temporal = full.clone().reshape(batch, frames, height * width, frames, height * width)
    for f in range(frames):
        temporal[:, f, :, f, :] = 0.0
    expected = {
        "full": full.mean(),
        "spatial": F.relu((frame_s - frame_t).abs() - margin).mean(),
        "temporal": temporal.mean() * frames / (frames - 1),
    }
    for variant, value in expected.items():
        loss = relation_distance(student, teacher, frames=frames, margin=margin, variant=variant, backend=backend)
        torch.testing.assert_close(loss, value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_five_d_input_matches_flattened(backend):
    batch, frames, height, width = 2, 3, 2, 3
    student, teacher = features(batch, frames, height * width, 5, 6, seed=4, shared_rank=SHARED_RANK)
    as_video = lambda x: x.view(batch, frames, height, width, -1)
    mask = query_mask("float", batch, frames * height * width)
    common = dict(variant="spatial", query_mask=mask, backend=backend)
    flat = value_and_grads(lambda s, t: relation_distance(s, t, frames=frames, **common), student, teacher)
    video = value_and_grads(lambda s, t: relation_distance(as_video(s), as_video(t), **common), student, teacher)
    explicit = relation_distance(as_video(student), as_video(teacher), frames=frames, **common)
    truth = _truth(student, teacher, frames, 0.1, "spatial", mask, reduction="mean")
    assert_close_to_truth(video, truth)
    for a, b in zip(video, flat):
        torch.testing.assert_close(a.view_as(b), b)
    torch.testing.assert_close(explicit, video[0])


def test_full_variant_needs_no_frames():
    student, teacher = features(*SHAPES["ragged"], seed=13, shared_rank=SHARED_RANK)
    torch.testing.assert_close(
        relation_distance(student, teacher, backend="torch"),
        relation_distance(student, teacher, frames=3, backend="torch"),
    )
    with pytest.raises(ValueError, match="frames is required"):
        relation_distance(student, teacher, variant="spatial")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "frames,hw", [(1, 1), (5, 1), (1, 2), (4, 3)], ids=["one_token", "hw1", "single_frame_tiny", "tiny"]
)
def test_degenerate_shapes(backend, variant, frames, hw):
    """One token, one token per frame, a single frame ("temporal": no pair, 0 with zero gradients)."""
    student, teacher = features(2, frames, hw, 3, 5, seed=5, shared_rank=SHARED_RANK)
    actual = value_and_grads(
        lambda s, t: relation_distance(s, t, frames=frames, variant=variant, reduction="none", backend=backend),
        student,
        teacher,
    )
    truth = _truth(student, teacher, frames, 0.1, variant)
    assert all(x.isfinite().all() for x in actual)
    assert_close_to_truth(actual, truth)
    if variant == "temporal" and frames == 1:
        assert all((x == 0).all() for x in actual)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_relations_give_zero(backend):
    """A teacher with the student's relations (a scaled copy): every |S - T| is rounding noise below the margin."""
    student, _ = features(*SHAPES["ragged"], seed=6, shared_rank=SHARED_RANK)
    actual = value_and_grads(
        lambda s, t: relation_distance(s, t, frames=3, reduction="sum", backend=backend), student, 3 * student
    )
    assert all((x == 0).all() for x in actual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reduced_precision_cpu(backend, dtype):
    """The reference within the dtype's tolerance of the float64 truth; the fused backends' error against it no
    worse than the reference's in the same dtype (+ a small tol)."""
    batch, frames, hw, cs, ct = SHAPES["ragged"]
    student, teacher = features(batch, frames, hw, cs, ct, dtype=dtype, seed=7, shared_rank=SHARED_RANK)
    margin = _margin_between_pairs(student, teacher, clearance=2e-3)
    mask = query_mask("float", batch, frames * hw)
    for variant in VARIANTS:
        kwargs = dict(frames=frames, margin=margin, variant=variant, query_mask=mask, reduction="none")
        run = lambda name: value_and_grads(  # noqa: E731
            lambda s, t: relation_distance(s, t, backend=name, **kwargs),  # noqa: B023
            student,
            teacher,
        )
        actual = run(backend)
        truth = _truth(student, teacher, frames, margin, variant, mask)
        assert actual[0].dtype == torch.float32
        assert actual[1].dtype == actual[2].dtype == dtype
        if backend == "reference":
            assert_close_to_truth(actual, truth, rel_tol=REFERENCE_TOLERANCE[dtype])
            continue
        # fp16 gradients are rounded once to the output dtype: which entry's rounding error is largest is chance,
        # so half an fp16 ulp of the gradient's scale is the slack.
        rel_tol = 1e-5 if dtype == torch.float32 else 2**-11
        assert_no_worse_than_reference(actual, run("reference"), truth, rel_tol)


@CUDA
@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_bf16_cuda(backend, variant, mask_kind):
    batch, frames, hw, cs, ct = 2, 3, 50, 40, 72
    # Clustered features: every |S_ij - T_ij| is within ~0.05 of 0 or 1, so bf16 rounding cannot move a pair across
    # the margin (with 90,000 pairs per video, random features put pairs at any distance from it).
    gen = torch.Generator().manual_seed(8)

    def clustered(channels, clusters):
        centres = torch.linalg.qr(torch.randn(channels, clusters, generator=gen))[0].T
        labels = torch.randint(clusters, (batch, frames * hw), generator=gen)
        noise = 0.01 * torch.randn(batch, frames * hw, channels, generator=gen) / channels**0.5
        return (3 * (centres[labels] + noise)).to("cuda", torch.bfloat16)

    student, teacher, margin = clustered(cs, 4), clustered(ct, 5), 0.1
    mask = query_mask(mask_kind, batch, frames * hw, device="cuda")
    kwargs = dict(frames=frames, margin=margin, variant=variant, query_mask=mask, reduction="mean")
    run = lambda name: value_and_grads(lambda s, t: relation_distance(s, t, backend=name, **kwargs), student, teacher)
    actual, same_dtype_reference = run(backend), run("reference")
    truth = _truth(student.cpu(), teacher.cpu(), frames, margin, variant, mask, reduction="mean")
    truth = [x.cuda() for x in truth]
    assert all(x.isfinite().all() for x in actual)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.bfloat16
    assert_no_worse_than_reference(actual, same_dtype_reference, truth, rel_tol=1e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_gradcheck_through_public_op(variant):
    student, teacher = features(2, 2, 3, 3, 4, dtype=torch.float64, seed=9, shared_rank=SHARED_RANK)
    margin = _margin_between_pairs(student, teacher, clearance=1e-4)
    mask = query_mask("float", 2, 6).double()
    mask[0, 1] = 0
    for weights in (mask, None):  # a general G, and a symmetric one (the mean's uniform gradient)
        kwargs = dict(frames=2, margin=margin, variant=variant, query_mask=weights, backend="torch")
        fn = lambda s, t, kwargs=kwargs: relation_distance(s, t, **kwargs)
        assert torch.autograd.gradcheck(fn, (student.requires_grad_(), teacher.requires_grad_()))
        assert fn(student, teacher).dtype == torch.float64


def test_float_mask_weights_get_gradients():
    student, teacher = features(*SHAPES["ragged"], seed=10, shared_rank=SHARED_RANK)
    mask = query_mask("float", 2, 21).requires_grad_()
    kwargs = dict(frames=3, variant="temporal", backend="torch")
    loss = relation_distance(student, teacher, query_mask=mask, reduction="sum", **kwargs)
    (grad,) = torch.autograd.grad(loss, mask)
    torch.testing.assert_close(grad, relation_distance(student, teacher, reduction="none", **kwargs))


class _BackendSpy:
    """Replaces every backend function; records the calls (or fails them when `forbid`)."""

    def __init__(self, monkeypatch, forbid):
        self.calls = []
        backends = importlib.import_module("stss_kernels.ops.relation_distance.op").BACKENDS
        for module, fn_name in backends.values():
            if not module.endswith(".triton_backend") or _triton_backend_importable():
                monkeypatch.setattr(importlib.import_module(module), fn_name, self._recorder(fn_name, forbid))

    def _recorder(self, fn_name, forbid):
        def record(student, teacher, frames, margin, variant, query_weight=None):
            if forbid:
                raise AssertionError(f"{fn_name} ran on invalid input")
            self.calls.append((fn_name, student, teacher, frames, margin, variant, query_weight))
            return torch.zeros(student.shape[:2], dtype=torch.float32)

        return record


def _bad_inputs():
    s, t = features(2, 3, 4, 5, 6, shared_rank=SHARED_RANK)
    video = lambda x: x.view(2, 3, 2, 2, -1)
    ok = dict(student=s, teacher=t, frames=3)
    meta = torch.device("meta")
    return [
        ("student_not_tensor", dict(ok, student=s.tolist()), TypeError, "student"),
        ("teacher_int", dict(ok, teacher=t.long()), TypeError, "teacher"),
        ("dtype_mismatch", dict(ok, teacher=t.double()), TypeError, "teacher"),
        ("rank4", dict(ok, student=s.view(2, 3, 4, 5)), ValueError, "student"),
        ("rank_mismatch", dict(student=video(s), teacher=t), ValueError, "rank"),
        ("batch_mismatch", dict(ok, teacher=t[:1]), ValueError, "batch"),
        ("token_mismatch", dict(ok, teacher=t[:, :6]), ValueError, "token"),
        ("grid_mismatch", dict(student=video(s), teacher=t.view(2, 3, 4, 1, -1)), ValueError, "token"),
        ("empty_channels", dict(ok, student=s[..., :0]), ValueError, "student"),
        ("frames_missing_spatial", dict(ok, frames=None, variant="spatial"), ValueError, "frames"),
        ("frames_not_dividing", dict(ok, frames=5), ValueError, "frames"),
        ("frames_zero", dict(ok, frames=0), ValueError, "frames"),
        ("frames_float", dict(ok, frames=3.0), TypeError, "frames"),
        ("frames_contradict_5d", dict(student=video(s), teacher=video(t), frames=4), ValueError, "frames"),
        ("mask_shape", dict(ok, query_mask=torch.ones(2, 11, dtype=torch.bool)), ValueError, "query_mask"),
        ("mask_dtype", dict(ok, query_mask=torch.ones(2, 12, dtype=torch.long)), TypeError, "query_mask"),
        ("mask_device", dict(ok, query_mask=torch.ones(2, 12, device=meta)), ValueError, "query_mask"),
        ("teacher_device", dict(ok, teacher=t.to(meta)), ValueError, "device"),
        ("margin_negative", dict(ok, margin=-0.1), ValueError, "margin"),
        ("margin_nan", dict(ok, margin=float("nan")), ValueError, "margin"),
        ("margin_inf", dict(ok, margin=float("inf")), ValueError, "margin"),
        ("margin_str", dict(ok, margin="0.1"), TypeError, "margin"),
        ("unknown_variant", dict(ok, variant="cross"), ValueError, "variant"),
        ("unknown_backend", dict(ok, backend="cuda"), ValueError, "backend"),
        ("unknown_reduction", dict(ok, reduction="avg"), ValueError, "reduction"),
    ]


def _call_with(case, backend=None):
    _, kwargs, _, _ = case
    kwargs = dict(kwargs) if backend is None else dict(kwargs, backend=backend)
    student, teacher = kwargs.pop("student"), kwargs.pop("teacher")
    return relation_distance(student, teacher, **kwargs)


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_input_raises_before_any_kernel(monkeypatch, case):
    """Validation is the op layer's, before it picks a backend (every backend is replaced by a spy that fails)."""
    _, _, error, argument = case
    _BackendSpy(monkeypatch, forbid=True)
    with pytest.raises(error, match=argument):
        _call_with(case)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_bad_input_raises_whichever_backend_is_named(monkeypatch, backend):
    """The one backend-dependent part: naming a backend does not move validation after the backend's code."""
    _BackendSpy(monkeypatch, forbid=True)
    case = next(case for case in _bad_inputs() if case[0] == "mask_shape")
    with pytest.raises(ValueError, match="query_mask"):
        _call_with(case, backend)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    student, teacher = features(*SHAPES["ragged"], shared_rank=SHARED_RANK)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        relation_distance(student, teacher, frames=3, backend="triton")


def test_backend_receives_normalised_input_dtype_tensors_and_float_weights(monkeypatch):
    spy = _BackendSpy(monkeypatch, forbid=False)
    student, teacher = features(*SHAPES["ragged"], dtype=torch.float16, shared_rank=SHARED_RANK)
    mask = query_mask("bool", 2, 21)
    relation_distance(student, teacher, frames=3, query_mask=mask, backend="auto", margin=0.2, variant="spatial")
    relation_distance(student, teacher, frames=3, normalize=False, backend="reference")
    (auto_call, raw_call) = spy.calls
    name, s, t, frames, margin, variant, weight = auto_call
    assert name == "relation_distance_torch" and (frames, margin, variant) == (3, 0.2, "spatial")
    assert s.dtype == t.dtype == torch.float16 and s.is_contiguous() and t.is_contiguous()
    torch.testing.assert_close(s.float().norm(dim=-1), torch.ones(2, 21), atol=2e-3, rtol=0)
    torch.testing.assert_close(t.float().norm(dim=-1), torch.ones(2, 21), atol=2e-3, rtol=0)
    assert weight.dtype == torch.float32 and torch.equal(weight, mask.float())
    assert raw_call[0] == "relation_distance_reference" and torch.equal(raw_call[1], student)
    assert raw_call[-2:] == ("full", None)


@CUDA
def test_auto_picks_triton_on_cuda(monkeypatch):
    spy = _BackendSpy(monkeypatch, forbid=False)
    student, teacher = features(*SHAPES["ragged"], device="cuda", shared_rank=SHARED_RANK)
    relation_distance(student, teacher, frames=3)
    assert spy.calls[0][0] == "relation_distance_triton"


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_module_matches_functional(backend):
    student, teacher = features(*SHAPES["ragged"], seed=11, shared_rank=SHARED_RANK)
    mask = query_mask("bool", 2, 21)
    settings = dict(margin=0.2, variant="temporal", normalize=False, reduction="sum", backend=backend)
    module = RelationDistance(**settings)
    expected = relation_distance(student, teacher, frames=3, query_mask=mask, **settings)
    torch.testing.assert_close(module(student, teacher, frames=3, query_mask=mask), expected)
    assert list(module.parameters()) == []
    assert "margin=0.2" in repr(module) and "variant='temporal'" in repr(module)
    assert f"backend='{backend}'" in repr(module)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(margin=-1), "margin"),
        (dict(variant="cross"), "variant"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="gpu"), "backend"),
    ],
)
def test_module_rejects_bad_settings(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        RelationDistance(**kwargs)


def test_package_exports():
    assert stss_kernels.relation_distance is relation_distance
    assert stss_kernels.RelationDistance is RelationDistance
    assert callable(stss_kernels.relation_distance_reference) and callable(stss_kernels.relation_distance_torch)
    assert {"relation_distance", "RelationDistance", "relation_distance_triton"} <= set(stss_kernels.__all__)
    if _triton_backend_importable():
        assert callable(stss_kernels.relation_distance_triton)
