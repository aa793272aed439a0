"""Token sharding for context parallelism: which contiguous token slice a rank holds, and the gathers that keep
gradients exact.

Under diffusers' context parallelism (a family's `_cp_plan`, e.g. Wan's) every block output is a contiguous slice
of the frame-major token sequence per rank, in rank order (docs/distributed.md). The alignment path keeps that
split: the projector's token-wise MLP runs on the local slice, the teacher features and motion masks are cut the
same way, and the sharded loss ops (`stss_kernels.tempered_kl` / `relation_distance` with `process_group=`) compute
the global loss. Every rank of the group ends with its slice of the single-process gradient; summing parameter
gradients over the group gives the one-process gradient (see tsa/training/parallel.py for the data-parallel
scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TokenShard:
    """A rank's place in a context-parallel group: `rank` of `size` ranks of `group`."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int

    @classmethod
    def of(cls, group) -> TokenShard:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def equal_bounds(self, num_tokens: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice when `num_tokens` splits into equal parts (diffusers' plans)."""
        if num_tokens % self.size:
            raise ValueError(
                f"{num_tokens} tokens do not split into {self.size} equal context-parallel shards (choose a "
                "resolution or frame count whose token count divides by --context-parallel)"
            )
        part = num_tokens // self.size
        return self.rank * part, (self.rank + 1) * part

    def split_bounds(self, num_tokens: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice in torch.tensor_split order (sizes differ by at most one)."""
        part, extra = divmod(num_tokens, self.size)
        start = self.rank * part + min(self.rank, extra)
        return start, start + part + (self.rank < extra)


class _GatherPartial(torch.autograd.Function):
    """All-gather equal slices along dim 1; backward sums the ranks' gradients and keeps the local slice (each
    rank's downstream loss used a different part of the gathered tensor)."""

    @staticmethod
    def forward(ctx, local, group, rank, size):
        ctx.group, ctx.rank, ctx.size = group, rank, size
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=1)[ctx.rank], None, None, None


def gather_tokens(local: torch.Tensor, shard: TokenShard) -> torch.Tensor:
    """(B, n, ...) equal local slices -> (B, n * size, ...) on every rank, differentiable: the gradient of the
    local slice is the sum over ranks of the gradients their losses send to it."""
    return _GatherPartial.apply(local, shard.group, shard.rank, shard.size)


def gather_uneven(local: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """(B, n_r, ...) slices of any sizes -> ((B, sum n_r, ...) on every rank, the sizes), not differentiable."""
    size = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local.shape[1]]), group=group)
    sizes = [int(count) for count in counts]
    if local.dtype == torch.bool:  # gloo has no bool collectives
        gathered, _ = gather_uneven(local.to(torch.uint8), group)
        return gathered.bool(), sizes
    padded = local.new_zeros(local.shape[0], max(sizes), *local.shape[2:])
    padded[:, : local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:, :count] for part, count in zip(parts, sizes)], dim=1), sizes


class _GatherReplicated(torch.autograd.Function):
    """All-gather slices of any sizes along dim 1; backward keeps the local slice of the gradient (every rank
    computes the same function of the gathered tensor, so each holds the whole gradient already)."""

    @staticmethod
    def forward(ctx, local, group):
        gathered, sizes = gather_uneven(local.detach(), group)
        rank = dist.get_rank(group)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return gathered

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.start : ctx.stop], None


def gather_replicated(local: torch.Tensor, group) -> torch.Tensor:
    """(B, n_r, ...) slices of any sizes -> (B, sum n_r, ...) on every rank, differentiable for a loss that every
    rank computes alike from the gathered tensor: the gradient of the local slice is its part of the whole."""
    return _GatherReplicated.apply(local, group)


def global_mean(local_sum: torch.Tensor, count: int, group) -> torch.Tensor:
    """sum over the group of `local_sum`, divided by `count`: the global value on every rank, with the gradient of
    the local term only (so gradients are the local slice of the one-process gradient)."""
    total = local_sum.detach().clone()
    dist.all_reduce(total, group=group)
    return (local_sum + (total - local_sum.detach())) / count


def token_count(grid) -> int:
    return math.prod(int(size) for size in grid)
