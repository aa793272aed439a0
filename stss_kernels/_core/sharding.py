"""Sharded tokens (context parallelism): an op on one contiguous token slice per rank of a process group.

Each rank r holds the slice (B, n_r, C) of the frame-major sequence (B, N, C); the slices in the group's rank
order make the whole sequence (uneven sizes and frames split anywhere are fine). The exact scheme:

1. `agree_on_inputs`: one all-gather of a small descriptor per rank (shapes, dtype, frames, mask kind, the op's
   options, or the local validation error). Every rank runs the same checks on the same gathered descriptors, so
   bad input raises the same error on every rank before any other collective: never a hang.
2. `gather_tokens`: an all-gather of the keys [s | t] (B, N, Cs + Ct), O(N C) per rank. Its backward sums the
   key gradients of every rank into the owner's slice (an all-to-all of the gradient slices, then a sum in rank
   order: deterministic, O(N C) per rank, no N x N).
3. The op's own backend on the gathered keys with a query mask that keeps only the local rows: the kept-query
   compaction of the backends makes the work proportional to n_r (times N keys). Queries and keys keep their
   global token index, so frames (and TRD's spatial / temporal pairs) are those of the whole sequence.
4. `reduce_sharded_rows`: "none" returns the local rows; "sum" / "mean" all-gather the local sums (and weight
   sums) and add them in rank order, so the value is identical on every rank.

Gradients: every rank back-propagates the same global loss once, so the backward of the global sum passes its
upstream gradient through unchanged (not summed over ranks); each rank's gradients are then its slice of the
one-process gradient, with no 1 / P. Communication per rank and step: (P - 1) / P * B * N * (Cs + Ct) elements
(padded to the largest shard) forward, the same backward, and O(P) scalars.
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from stss_kernels._core.backends import accumulation_dtype
from stss_kernels._core.normalize import l2_normalize
from stss_kernels._core.reduction import REDUCTIONS, skip_hint
from stss_kernels._core.validation import check_choice, check_feature_pair, query_weight

# Bytes of one rank's descriptor in the first collective (JSON, zero padded); error messages are cut to fit.
DESCRIPTOR_BYTES = 1024
_ERROR_TYPES = {"TypeError": TypeError, "ValueError": ValueError}

# Fields every rank must agree on, and how an error names them.
_AGREED_FIELDS = {
    "batch": "batch size B",
    "student_channels": "student channels Cs",
    "teacher_channels": "teacher channels Ct",
    "dtype": "dtype",
    "device_type": "device type",
    "frames": "frames",
    "mask": "query_mask kind (None, bool or float)",
    "reduction": "reduction",
    "normalize": "normalize",
}

_bytes_log: list[int] | None = None


@contextlib.contextmanager
def count_communication() -> Iterator[list[int]]:
    """Within the block, the sharded ops append the bytes each of their collectives sends from this rank to the
    yielded list (ring / pairwise algorithms: (P - 1) times the per-rank chunk). Used by the benchmark."""
    global _bytes_log
    outer, _bytes_log = _bytes_log, []
    try:
        yield _bytes_log
    finally:
        _bytes_log = outer


def _log_sent(num_bytes: int) -> None:
    if _bytes_log is not None:
        _bytes_log.append(int(num_bytes))


def _collective_device(group) -> torch.device:
    """Where the descriptor lives: the current CUDA device for NCCL (which only moves CUDA tensors), else the CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_stacked(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `local` (all of one shape) stacked in rank order: (P, *local.shape)."""
    size = dist.get_world_size(group)
    if size == 1:  # nothing to exchange: skip the collective's latency
        return local.reshape(1, *local.shape)
    flat = local.new_empty(size * local.numel())
    # torch 2.13 renames all_gather_into_tensor to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(flat, local.contiguous().view(-1), group=group)
    _log_sent((size - 1) * local.numel() * local.element_size())
    return flat.view(size, *local.shape)


class ShardLayout:
    """Token counts of every rank's slice (in rank order) and this rank's place in the whole sequence."""

    def __init__(self, sizes: list[int], rank: int):
        self.sizes, self.rank = list(sizes), rank
        self.start = sum(sizes[:rank])
        self.stop = self.start + sizes[rank]
        self.total = sum(sizes)


def _describe(student, teacher, frames, query_mask, reduction, normalize, options) -> dict:
    return {
        "batch": student.shape[0],
        "tokens": student.shape[1],
        "student_channels": student.shape[2],
        "teacher_channels": teacher.shape[2],
        "dtype": str(student.dtype),
        "device_type": student.device.type,
        "frames": frames,
        "mask": "none" if query_mask is None else ("bool" if query_mask.dtype == torch.bool else "float"),
        "reduction": reduction,
        "normalize": bool(normalize),
        **options,
    }


def _encode(entry: dict) -> bytes:
    """The descriptor as JSON (values JSON cannot hold compare by their repr), cut to DESCRIPTOR_BYTES."""
    payload = json.dumps(entry, sort_keys=True, default=repr).encode()
    if len(payload) > DESCRIPTOR_BYTES:
        kind, message = entry.get("error", ["ValueError", f"the op's options do not fit a descriptor: {entry}"])
        entry = {"error": [kind, message[: DESCRIPTOR_BYTES // 2] + " ..."]}
        payload = json.dumps(entry).encode()
    return payload


def agree_on_inputs(op_name: str, group, entry: dict) -> list[dict]:
    """All-gather every rank's descriptor `entry` (or {"error": [type, message]}) and raise the first problem, the
    same on every rank: a rank's own validation error, then any field that differs between ranks. Returns the
    descriptors in rank order."""
    local = torch.zeros(DESCRIPTOR_BYTES, dtype=torch.uint8)
    payload = _encode(entry)
    local[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    rows = all_gather_stacked(local.to(_collective_device(group)), group).cpu()
    entries = [json.loads(bytes(row.tolist()).rstrip(b"\0").decode()) for row in rows]
    prefix = f"{op_name}(process_group=...)"
    for rank, other in enumerate(entries):
        if "error" in other:
            kind, message = other["error"]
            raise _ERROR_TYPES.get(kind, RuntimeError)(f"{prefix}: rank {rank}: {message}")
    for field in sorted(set().union(*entries) - {"tokens"}):
        values = [other.get(field) for other in entries]
        if any(value != values[0] for value in values):
            name = _AGREED_FIELDS.get(field, field)
            by_rank = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
            hint = " (each rank passes the frame count of the whole sequence)" if field == "frames" else ""
            raise ValueError(f"{prefix}: {name} must be the same on every rank, got {by_rank}{hint}")
    total, frames = sum(other["tokens"] for other in entries), entries[0]["frames"]
    if total % frames:
        sizes = [other["tokens"] for other in entries]
        raise ValueError(
            f"{prefix}: frames must be a positive divisor of the whole sequence's token count N={total} "
            f"(shards {sizes}), got {frames}"
        )
    return entries


class _GatherTokens(torch.autograd.Function):
    """(B, n_r, C) local slice -> (B, N, C) whole sequence; backward: the sum over ranks of each rank's gradient of
    the whole sequence, restricted to this rank's slice."""

    @staticmethod
    def forward(ctx, local, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        batch, count, channels = local.shape
        widest = max(sizes)
        padded = local.new_zeros((batch, widest, channels))
        padded[:, :count] = local
        gathered = all_gather_stacked(padded, group)
        return torch.cat([gathered[q, :, :n] for q, n in enumerate(sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad_full):
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        batch, _, channels = grad_full.shape
        widest = max(sizes)
        send = grad_full.new_zeros((len(sizes), batch, widest, channels))
        for q, block in enumerate(grad_full.split(sizes, dim=1)):
            send[q, :, : sizes[q]] = block
        received = send
        if len(sizes) > 1:
            received = torch.empty_like(send)
            dist.all_to_all_single(received, send, group=group)
            _log_sent((len(sizes) - 1) * send[0].numel() * send.element_size())
        # Summed in rank order in the accumulation dtype: the same bits whatever the collective's algorithm.
        total = received[0, :, : sizes[rank]].to(accumulation_dtype(grad_full.dtype))
        for q in range(1, len(sizes)):
            total = total + received[q, :, : sizes[rank]]
        return total.to(grad_full.dtype), None, None, None


def gather_tokens(local: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
    """All-gather the slices (B, n_r, C) into the whole sequence (B, N, C), differentiably (see _GatherTokens)."""
    return _GatherTokens.apply(local.contiguous(), layout.sizes, layout.rank, group)


class _GlobalSum(torch.autograd.Function):
    """(k,) local partial sums -> (k,) their sum over the ranks, added in rank order (identical on every rank).

    Backward passes the gradient through: every rank back-propagates the same global value once, and each rank's
    graph holds only its own partial sums.
    """

    @staticmethod
    def forward(ctx, local, group):
        gathered = all_gather_stacked(local, group)
        total = gathered[0]
        for q in range(1, len(gathered)):
            total = total + gathered[q]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


def reduce_sharded_rows(
    rows: torch.Tensor, weight: torch.Tensor | None, reduction: str, total_tokens: int, group
) -> torch.Tensor:
    """Local rows (B, n_r) -> w * rows (local), or the global sum / weighted mean over every rank's rows."""
    if weight is not None:
        rows = weight * rows
    if reduction == "none":
        return rows
    if reduction == "sum":
        return _GlobalSum.apply(rows.sum().reshape(1), group)[0]
    if weight is None:
        return _GlobalSum.apply(rows.sum().reshape(1), group)[0] / (rows.shape[0] * total_tokens)
    total, weight_sum = _GlobalSum.apply(torch.stack([rows.sum(), weight.sum()]), group)
    # An empty global mask gives total == 0: divide by 1 there, so value and gradients stay 0.
    return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))


def _check_local(student, teacher, frames, query_mask, reduction, check_options):
    """The op's checks on this rank's slice; returns the float weights (B, n_r) or None."""
    check_options()
    check_feature_pair(student, teacher, ranks=(3, 5))
    if student.dim() != 3:
        raise ValueError(
            "with process_group, student and teacher must be (B, n_r, C) token slices of the frame-major sequence "
            f"(a slice may split a frame), got shape {tuple(student.shape)}"
        )
    if frames is None:
        raise ValueError("frames is required with process_group: the frame count of the whole sequence")
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1:
        raise ValueError(f"frames must be a positive int (the whole sequence's frame count), got {frames!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    return query_weight(query_mask, student, accumulation_dtype(student.dtype))


def sharded_loss(
    op_name: str,
    rows_fn: Callable[..., torch.Tensor],
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    frames,
    query_mask: torch.Tensor | None,
    normalize: bool,
    reduction: str,
    process_group,
    options: dict,
    check_options: Callable[[], None],
) -> torch.Tensor:
    """An op on this rank's token slice of the whole sequence (see the module docstring for the contract).

    rows_fn(student (B, N, Cs), teacher (B, N, Ct), frames=, query_mask= (B, N) bool) -> (B, N): the op on the
    whole (already normalised) sequence with reduction "none", computing only the rows the mask keeps.
    options: the op's own settings, which every rank must share (JSON values); check_options() validates them
    and raises the op's usual errors. Returns the reduced loss, or the local rows (B, n_r) for "none".
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op_name}: process_group needs an initialised torch.distributed (init_process_group)")
    entry, weight = {}, None
    try:
        weight = _check_local(student, teacher, frames, query_mask, reduction, check_options)
        entry = _describe(student, teacher, frames, query_mask, reduction, normalize, options)
    except Exception as error:  # any local failure is every rank's: raised below on all of them
        entry = {"error": [type(error).__name__, str(error)]}
    entries = agree_on_inputs(op_name, process_group, entry)
    layout = ShardLayout([other["tokens"] for other in entries], dist.get_rank(process_group))

    if normalize:
        student, teacher = l2_normalize(student), l2_normalize(teacher)
    keys = gather_tokens(torch.cat([student, teacher], dim=-1), layout, process_group)
    whole_student, whole_teacher = keys.split([student.shape[-1], teacher.shape[-1]], dim=-1)

    # Only this rank's queries run; of those, rows of weight 0 are skipped unless the weights need their gradient.
    hint = skip_hint(weight)
    local_keep = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device) if hint is None else hint != 0
    keep = torch.zeros((student.shape[0], layout.total), dtype=torch.bool, device=student.device)
    keep[:, layout.start : layout.stop] = local_keep
    rows = rows_fn(whole_student, whole_teacher, frames=frames, query_mask=keep)[:, layout.start : layout.stop]
    return reduce_sharded_rows(rows, weight, reduction, layout.total, process_group)
