"""What the op tests share: one feature builder, one float64 truth per op written out from the formulas
(docs/method.md; never stss_kernels' own reference), value-and-gradient helpers and the tolerance rules.

The truths are plain float64 matrix products and loops over frames: a test that compares a backend with
them cannot pass because the backend and its truth share a mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A token whose norm is at most this has no direction: normalising leaves it (near) zero, as F.normalize does.
NORM_EPS = 1e-12

# How close the naive reference, computed from inputs of this dtype, comes to the float64 truth at the test sizes,
# relative to each output's scale (its largest magnitude).
REFERENCE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

OUTPUT_NAMES = ("value", "grad_student", "grad_teacher")


def features(
    batch: int,
    frames: int,
    hw: int,
    cs: int,
    ct: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    scale: float = 1.0,
    shared_rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student (batch, frames * hw, cs) and teacher (batch, frames * hw, ct) features, drawn in float64 from a
    seeded generator, times `scale`, in `dtype` on `device`.

    shared_rank > 0: both sides share a random component of that rank (plus 0.8 x independent noise), so S and T
    are correlated (|S - T| then straddles small margins, and the softmaxes are far from uniform).
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = frames * hw
    shared = torch.randn(batch, tokens, shared_rank, generator=generator, dtype=torch.float64)

    def side(channels: int) -> torch.Tensor:
        noise = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
        if not shared_rank:
            return noise
        mixing = torch.randn(shared_rank, channels, generator=generator, dtype=torch.float64)
        return shared @ mixing + 0.8 * noise

    student, teacher = side(cs) * scale, side(ct) * scale
    return student.to(device, dtype), teacher.to(device, dtype)


def query_mask(kind: str, batch: int, num_tokens: int, device: torch.device | str = "cpu", seed: int = 1):
    """A query mask (B, N) of `kind`: "none" (None), "bool" (about 40% kept), "float" (weights in [0, 2)),
    "empty" (nothing kept) or "full" (everything kept)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":
        return (torch.rand(batch, num_tokens, generator=generator) < 0.4).to(device)
    if kind == "float":
        return torch.rand(batch, num_tokens, generator=generator).mul(2).to(device)
    if kind == "empty":
        return torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    raise ValueError(f"kind must be none, bool, float, empty or full, got {kind!r}")


# --- float64 truths --------------------------------------------------------------------------------------


def _unit_rows(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(B, N, C) float64 tokens, divided by max(||x||, eps) when normalize."""
    x = x.double().flatten(1, -2)
    if not normalize:
        return x
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _reduce(rows: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """reduction "none" -> w * rows, "sum" -> its sum, "mean" -> sum(w * rows) / sum(w) (0 for sum(w) = 0)."""
    w = torch.ones_like(rows) if weight is None else weight.double()
    if reduction == "none":
        return w * rows
    if reduction == "sum":
        return (w * rows).sum()
    return (w * rows).sum() / w.sum() if w.sum() > 0 else (w * rows).sum() * 0


def tempered_kl_truth(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    tau_student: float,
    tau_teacher: float,
    *,
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "none",
) -> torch.Tensor:
    """The tempered KL in float64 (docs/method.md, TSA), one target frame at a time.

    For query i and frame f: P_t = softmax(T[i, f-block] / tau_teacher), P_s likewise from S = s s^T,
    KL[i, f] = sum_j P_t (log P_t - log P_s); row i is the mean of KL[i, f] over the frames. Each log-softmax is
    written out as z - max z - log sum exp(z - max z).
    """
    s, t = _unit_rows(student, normalize), _unit_rows(teacher, normalize)
    hw = s.shape[1] // frames
    sim_s, sim_t = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
    kl_per_frame = []
    for frame in range(frames):
        keys = slice(frame * hw, (frame + 1) * hw)
        logits_s, logits_t = sim_s[..., keys] / tau_student, sim_t[..., keys] / tau_teacher
        shifted_s = logits_s - logits_s.max(-1, keepdim=True).values
        shifted_t = logits_t - logits_t.max(-1, keepdim=True).values
        log_p_s = shifted_s - shifted_s.exp().sum(-1, keepdim=True).log()
        log_p_t = shifted_t - shifted_t.exp().sum(-1, keepdim=True).log()
        kl_per_frame.append((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1))
    rows = torch.stack(kl_per_frame, -1).mean(-1)
    return _reduce(rows, weight, reduction)


def relation_distance_truth(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    margin: float,
    variant: str,
    *,
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "none",
) -> torch.Tensor:
    """The relation distance in float64 (docs/method.md, TRD): row i is the mean over its pairs j of
    relu(|S_ij - T_ij| - margin); pairs: every j (full), j in i's frame (spatial), j in another frame
    (temporal); 0 for a row without pairs."""
    s, t = _unit_rows(student, normalize), _unit_rows(teacher, normalize)
    num_tokens = s.shape[1]
    hw = num_tokens // frames
    distance = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).abs() - margin).clamp_min(0)
    pairs = torch.zeros(num_tokens, num_tokens, dtype=torch.float64)
    for query_frame in range(frames):
        for key_frame in range(frames):
            same_frame = query_frame == key_frame
            counted = {"full": True, "spatial": same_frame, "temporal": not same_frame}[variant]
            pairs[query_frame * hw : (query_frame + 1) * hw, key_frame * hw : (key_frame + 1) * hw] = float(counted)
    rows = (distance * pairs).sum(-1) / pairs.sum(-1).clamp_min(1)
    return _reduce(rows, weight, reduction)


# --- values and gradients --------------------------------------------------------------------------------


def upstream_like(out: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random upstream gradient for `out` (in out's dtype and device)."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)


def value_and_grads(
    fn: Callable,
    student: torch.Tensor,
    teacher: torch.Tensor,
    upstream: torch.Tensor | None = None,
    *,
    teacher_grad: bool = True,
) -> tuple[torch.Tensor, ...]:
    """fn(student, teacher), and the gradients of <out, upstream> (default: the fixed upstream of `upstream_like`)
    with respect to the student and the teacher (None for the teacher when not teacher_grad)."""
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    out = fn(student, teacher)
    upstream = upstream_like(out) if upstream is None else upstream.to(out)
    leaves = (student, teacher) if teacher_grad else (student,)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out.detach(), grads[0], grads[1] if teacher_grad else None


def truth_value_and_grads(truth: Callable, student: torch.Tensor, teacher: torch.Tensor, *args, **kwargs):
    """Value and gradients of truth(student, teacher, *args, **kwargs) on float64 CPU copies of the inputs."""
    return value_and_grads(
        lambda s, t: truth(s, t, *args, **kwargs), student.detach().double().cpu(), teacher.detach().double().cpu()
    )


# --- tolerance rules -------------------------------------------------------------------------------------


def assert_verbose_allclose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_print: int = 5,
    name: str = "tensor",
) -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere (NaN and inf must match), compared in float64 on
    the CPU; otherwise an AssertionError that says how many elements mismatch and shows the first `max_print`."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    difference = (actual - expected).abs()
    mismatched = difference > atol + rtol * expected.abs()
    mismatched |= actual.isnan() != expected.isnan()
    mismatched |= actual.isinf() != expected.isinf()
    mismatched &= ~(actual.isinf() & (actual == expected))
    if not mismatched.any():
        return
    indices = mismatched.nonzero()
    finite = difference[difference.isfinite()]
    largest = f"; largest finite difference {finite.max().item():.3g}" if finite.numel() else ""
    lines = [f"{name}: {len(indices)} of {actual.numel()} elements mismatch (rtol {rtol:.3g}, atol {atol:.3g})"
             + largest]  # fmt: skip
    for index in indices[:max_print]:
        at = tuple(index.tolist())
        lines.append(f"  at {at}: actual {actual[at].item():.10g}, expected {expected[at].item():.10g}")
    if len(indices) > max_print:
        lines.append(f"  ... and {len(indices) - max_print} more")
    raise AssertionError("\n".join(lines))


def scale_of(tensor: torch.Tensor) -> float:
    """The largest magnitude in `tensor` (the scale a relative tolerance is taken against)."""
    return tensor.detach().abs().max().item() if tensor.numel() else 0.0


def assert_close_to_truth(
    actual: Sequence[torch.Tensor],
    truth: Sequence[torch.Tensor],
    rel_tol: float = 1e-5,
    names: Sequence[str] = OUTPUT_NAMES,
) -> None:
    """Each output (value, gradients) within rel_tol of its truth's scale (plus 1e-12) everywhere."""
    assert len(actual) == len(truth)
    for name, a, expected in zip(names, actual, truth):
        assert_verbose_allclose(a, expected, rtol=0.0, atol=rel_tol * scale_of(expected) + 1e-12, name=name)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_no_worse_than_reference(
    actual: Sequence[torch.Tensor],
    same_dtype_reference: Sequence[torch.Tensor],
    truth: Sequence[torch.Tensor],
    rel_tol: float,
    names: Sequence[str] = OUTPUT_NAMES,
    factor: float = 1.0,
) -> None:
    """Reduced precision's acceptance rule: each output's max error against the float64 truth at most `factor`
    times the naive reference's error in the same dtype, plus rel_tol of the truth's scale."""
    for name, a, reference, expected in zip(names, actual, same_dtype_reference, truth):
        error, reference_error = max_error(a, expected), max_error(reference, expected)
        assert error <= factor * reference_error + rel_tol * scale_of(expected), (
            f"{name}: max error {error:.3g} against the float64 truth, the reference's {reference_error:.3g}"
        )
