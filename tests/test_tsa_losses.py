"""TSA / M-TSA, TRD and REPA losses against float64 computations written out by hand."""

import pytest
import torch

from tsa.losses import REPALoss, TRDLoss, TSALoss
from tsa.masks import motion_query_mask


def _features(batch=2, frames=3, height=2, width=3, channels=(5, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, frames, height, width, channels[0], generator=generator, dtype=torch.float64)
    teacher = torch.randn(batch, frames, height, width, channels[1], generator=generator, dtype=torch.float64)
    return student.requires_grad_(), teacher


def _tsa_by_hand(student, teacher, tau_s, tau_t, mask=None):
    """docs/method.md, TSA: per query i and target frame f, KL(softmax(T[i, f]/tau_t) || softmax(S[i, f]/tau_s))."""
    batch, frames, height, width, _ = student.shape
    tokens, per_frame = frames * height * width, height * width
    s = student.reshape(batch, tokens, -1)
    t = teacher.reshape(batch, tokens, -1)
    s = s / s.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    total, count = 0.0, 0
    for b in range(batch):
        for i in range(tokens):
            if mask is not None and not mask[b, i]:
                continue
            count += 1
            for f in range(frames):
                keys = slice(f * per_frame, (f + 1) * per_frame)
                log_p_s = torch.log_softmax(s[b, keys] @ s[b, i] / tau_s, dim=0)
                log_p_t = torch.log_softmax(t[b, keys] @ t[b, i] / tau_t, dim=0)
                total = total + (log_p_t.exp() * (log_p_t - log_p_s)).sum() / frames
    return total / count


@pytest.mark.parametrize("tau_teacher", [None, 0.25])
def test_tsa_equals_hand_computation(tau_teacher):
    student, teacher = _features()
    loss = TSALoss(tau=0.1, tau_teacher=tau_teacher)(student, teacher)
    expected = _tsa_by_hand(student, teacher, 0.1, 0.1 if tau_teacher is None else tau_teacher)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)


def test_mtsa_mask_from_video_and_explicit_mask():
    student, teacher = _features(frames=2, height=3, width=2)
    video = torch.randn(2, 4, 3, 6, 4, generator=torch.Generator().manual_seed(3))  # tubelets 2 x 2 x 2
    mask = motion_query_mask(video, (2, 2, 2), top_k=0.34)
    assert mask.view(2, 2, 6).sum(-1).eq(2).all()
    loss = TSALoss(masked=True, top_k=0.34)(student, teacher, video=video)
    expected = _tsa_by_hand(student, teacher, 0.1, 0.1, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(TSALoss()(student, teacher, query_mask=mask), expected, rtol=1e-9, atol=1e-12)


def test_tsa_low_precision_runs():
    student, teacher = _features()
    loss = TSALoss()(student.detach().float().requires_grad_(), teacher.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), _tsa_by_hand(student, teacher, 0.1, 0.1), rtol=5e-2, atol=1e-3)


def test_tsa_bad_inputs():
    student, teacher = _features()
    with pytest.raises(ValueError, match="needs `video`"):
        TSALoss(masked=True)(student, teacher)
    with pytest.raises(ValueError, match=r"\(B, F, H, W\) grids differ"):
        TSALoss()(student, teacher[:, :2])
    with pytest.raises(ValueError, match="does not tile the feature grid"):
        TSALoss(masked=True)(student, teacher, video=torch.zeros(2, 5, 3, 4, 6))
    with pytest.raises(ValueError, match="student must be floating"):
        TSALoss()(student.flatten(1, 3), teacher)


def _trd_by_hand(student, teacher, margin, variant):
    batch, frames, height, width, _ = student.shape
    s = torch.nn.functional.normalize(student.reshape(batch, -1, student.shape[-1]), dim=-1)
    t = torch.nn.functional.normalize(teacher.reshape(batch, -1, teacher.shape[-1]), dim=-1)
    excess = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).abs() - margin).relu()
    frame = torch.arange(s.shape[1]) // (height * width)
    same = frame[:, None] == frame[None, :]
    return {"full": excess.mean(), "spatial": excess[:, same].mean(), "temporal": excess[:, ~same].mean()}[variant]


def _trd_gram_before_relation_distance(student, teacher, margin, variant, chunk_size=4):
    """TRDLoss as it was before it ran on stss_kernels.relation_distance: full Gram row blocks in PyTorch."""
    batch, frames, height, width = student.shape[:4]
    s = torch.nn.functional.normalize(student, dim=-1)
    t = torch.nn.functional.normalize(teacher.to(student.dtype), dim=-1)
    per_frame = height * width
    if variant == "spatial":
        s, t = s.reshape(batch * frames, per_frame, -1), t.reshape(batch * frames, per_frame, -1)
        pairs = batch * frames * per_frame**2
    else:
        s, t = s.reshape(batch, frames * per_frame, -1), t.reshape(batch, frames * per_frame, -1)
        pairs = batch * (frames * per_frame) ** 2 - (batch * frames * per_frame**2 if variant == "temporal" else 0)
    total = s.new_zeros(())
    for start in range(0, s.shape[1], chunk_size):
        rows = slice(start, start + chunk_size)
        excess = ((s[:, rows] @ s.transpose(1, 2) - t[:, rows] @ t.transpose(1, 2)).abs() - margin).relu()
        if variant == "temporal":
            row_frame = torch.arange(s.shape[1])[rows] // per_frame
            excess = excess * (row_frame[:, None] != torch.arange(s.shape[1])[None, :] // per_frame)
        total = total + excess.sum()
    return total / max(pairs, 1)


@pytest.mark.parametrize("variant", ["full", "spatial", "temporal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trd_values_and_gradients(variant, dtype):
    student, teacher = _features()
    student, teacher = student.detach().to(dtype).requires_grad_(), teacher.to(dtype).requires_grad_()
    loss = TRDLoss(margin=0.1, variant=variant)(student, teacher)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for expected in (
        _trd_by_hand(student, teacher, 0.1, variant),
        _trd_gram_before_relation_distance(student, teacher, 0.1, variant),
    ):
        assert loss.dtype == expected.dtype
        torch.testing.assert_close(loss, expected, **tol)
        grads = torch.autograd.grad(loss, (student, teacher), retain_graph=True)
        expected_grads = torch.autograd.grad(expected, (student, teacher))
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, **tol)


def test_trd_degenerate_cases():
    student, _ = _features(frames=1)
    loss = TRDLoss(variant="temporal")(student, student.detach())
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert TRDLoss()(student, student.detach() * 3).item() == 0.0  # identical relations
    with pytest.raises(ValueError, match="variant must be one of"):
        TRDLoss(variant="cross")
    with pytest.raises(ValueError, match="backend"):
        TRDLoss(backend="cuda")(student, student.detach())


def test_repa():
    student, teacher = _features(channels=(6, 6))
    expected = -torch.nn.functional.cosine_similarity(student, teacher, dim=-1).mean()
    torch.testing.assert_close(REPALoss()(student, teacher), expected)
    torch.testing.assert_close(REPALoss()(student, student.detach() * 2), torch.tensor(-1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="student and teacher shapes differ"):
        REPALoss()(*_features())
