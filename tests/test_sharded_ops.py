"""Sharded tokens (`process_group=`): tempered_kl and relation_distance on 2 and 3 gloo processes against the
one-process op and an fp64 truth written from the formulas; uneven shards that split frames, every TRD variant,
bool and float masks, every reduction, every backend, values and gradients; bad input raises on every rank.

Each test spawns one process group and runs its whole grid of cases inside it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stss_kernels import RelationDistance, TemperedKL, relation_distance, tempered_kl
from stss_kernels._core.backends import triton_available

# (batch, frames, hw, student channels, teacher channels) of the whole sequence: N = 15 tokens.
SHAPE = (2, 3, 5, 5, 6)
# Token counts per rank: uneven, and every cut inside a frame (frames are tokens 0-4, 5-9, 10-14).
SHARDS = {2: [8, 7], 3: [4, 7, 4]}
OPS = (
    ("tempered_kl", None),
    ("relation_distance", "full"),
    ("relation_distance", "spatial"),
    ("relation_distance", "temporal"),
)
MASKS = ("none", "bool", "float")
REDUCTIONS = ("none", "sum", "mean")
TAU_STUDENT, TAU_TEACHER, MARGIN = 0.2, 0.15, 0.1
pytestmark = pytest.mark.slow  # multi-process

# A collective that waits longer than this fails instead of hanging the test.
COLLECTIVE_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------------------------
# fp64 truth, from the formulas (SPEC sections 2 and 5)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _truth_rows(op, variant, student, teacher, frames):
    """Per-query value (B, N) in fp64 from cosine Gram matrices."""
    s, t = _unit(student.double()), _unit(teacher.double())
    sim_s, sim_t = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
    num_tokens = s.shape[1]
    per_frame = num_tokens // frames
    frame_of = torch.arange(num_tokens) // per_frame
    if op == "tempered_kl":
        kl = torch.zeros(s.shape[:2], dtype=torch.float64)
        for f in range(frames):
            block = frame_of == f
            log_p_s = sim_s[:, :, block] / TAU_STUDENT
            log_p_s = log_p_s - torch.logsumexp(log_p_s, -1, keepdim=True)
            log_p_t = sim_t[:, :, block] / TAU_TEACHER
            log_p_t = log_p_t - torch.logsumexp(log_p_t, -1, keepdim=True)
            kl = kl + (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
        return kl / frames
    same = frame_of[:, None] == frame_of[None, :]
    pairs = {"full": torch.ones_like(same), "spatial": same, "temporal": ~same}[variant].double()
    distance = torch.clamp((sim_s - sim_t).abs() - MARGIN, min=0.0) * pairs
    return distance.sum(-1) / pairs.sum(-1).clamp_min(1.0)


def _truth_reduce(rows, weight, reduction):
    if weight is not None:
        rows = weight * rows
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (rows.numel() if weight is None else weight.sum())


# ---------------------------------------------------------------------------------------------------------------
# inputs and one case


def _inputs(mask_kind, seed=0):
    """Whole-sequence student, teacher (fp64), mask (B, N) or None, and a cotangent (B, N) for reduction "none"."""
    batch, frames, hw, cs, ct = SHAPE
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(batch, frames * hw, 3, generator=gen, dtype=torch.float64)

    def side(channels):
        mixing = torch.randn(3, channels, generator=gen, dtype=torch.float64)
        return shared @ mixing + 0.8 * torch.randn(batch, frames * hw, channels, generator=gen, dtype=torch.float64)

    student, teacher = side(cs), side(ct)
    cotangent = torch.randn(batch, frames * hw, generator=gen, dtype=torch.float64)
    kept = torch.rand(batch, frames * hw, generator=gen) < 0.6
    if mask_kind == "none":
        mask = None
    elif mask_kind == "bool":
        mask = kept
    else:  # weights in [0.5, 1.5], zero where not kept
        mask = torch.where(kept, 0.5 + torch.rand(batch, frames * hw, generator=gen, dtype=torch.float64), 0.0)
    return student, teacher, mask, cotangent


def _call(op, variant, student, teacher, mask, reduction, backend, process_group=None):
    if op == "tempered_kl":
        return tempered_kl(
            student, teacher, frames=SHAPE[1], tau_student=TAU_STUDENT, tau_teacher=TAU_TEACHER, query_mask=mask,
            reduction=reduction, backend=backend, process_group=process_group,
        )  # fmt: skip
    return relation_distance(
        student, teacher, frames=SHAPE[1], margin=MARGIN, variant=variant, query_mask=mask, reduction=reduction,
        backend=backend, process_group=process_group,
    )  # fmt: skip


def _loss_and_grads(op, variant, student, teacher, mask, cotangent, reduction, backend, dtype, process_group=None):
    """The op's value and the gradients of its loss (the value, or sum(rows * cotangent) for "none") with respect
    to student, teacher and a float mask, each a fresh leaf in `dtype`."""
    fresh = lambda x: x.detach().to(dtype).clone().requires_grad_()
    leaves = [fresh(student), fresh(teacher)]
    if mask is not None and mask.is_floating_point():
        leaves.append(fresh(mask))
        mask = leaves[-1]
    value = _call(op, variant, leaves[0], leaves[1], mask, reduction, backend, process_group)
    loss = (value * cotangent.to(value.dtype)).sum() if reduction == "none" else value
    loss.backward()
    return value.detach().double(), [leaf.grad.double() for leaf in leaves]


def _close(name, got, want, tolerance):
    error = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-3)
    assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.3g}"


def _check_case(rank, world, op, variant, backend, mask_kind, reduction):
    """One case on this rank: the sharded op on the local slice against the one-process op and the truth."""
    sizes = SHARDS[world]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    student, teacher, mask, cotangent = _inputs(mask_kind)
    # fp64 except for Triton (fp32 / fp16 / bf16 only).
    dtype, tolerance = (torch.float32, 2e-4) if backend == "triton" else (torch.float64, 1e-10)
    label = f"{op}/{variant}/{backend}/mask={mask_kind}/{reduction}/P={world}/rank {rank}"

    local = lambda x: None if x is None else x[:, start:stop].clone()
    value, grads = _loss_and_grads(
        op, variant, local(student), local(teacher), local(mask), local(cotangent), reduction, backend, dtype,
        dist.group.WORLD,
    )  # fmt: skip
    one_value, one_grads = _loss_and_grads(op, variant, student, teacher, mask, cotangent, reduction, backend, dtype)

    truth_leaves = [student.clone().requires_grad_(), teacher.clone().requires_grad_()]
    truth_mask = mask
    if mask is not None and mask.is_floating_point():
        truth_mask = mask.clone().requires_grad_()
        truth_leaves.append(truth_mask)
    weight = None if truth_mask is None else truth_mask.double()
    truth_value = _truth_reduce(_truth_rows(op, variant, *truth_leaves[:2], SHAPE[1]), weight, reduction)
    ((truth_value * cotangent).sum() if reduction == "none" else truth_value).backward()
    truth_value, truth_grads = truth_value.detach(), [leaf.grad for leaf in truth_leaves]

    if reduction == "none":
        one_value, truth_value = one_value[:, start:stop], truth_value[:, start:stop]
    assert value.shape == one_value.shape, f"{label}: shape {tuple(value.shape)} != {tuple(one_value.shape)}"
    _close(f"{label} value vs one process", value, one_value, tolerance)
    _close(f"{label} value vs truth", value, truth_value, tolerance)
    for name, grad, one_grad, truth_grad in zip(("student", "teacher", "mask"), grads, one_grads, truth_grads):
        _close(f"{label} {name} grad vs one process", grad, one_grad[:, start:stop], tolerance)
        _close(f"{label} {name} grad vs truth", grad, truth_grad[:, start:stop], tolerance)


# ---------------------------------------------------------------------------------------------------------------
# the worker grids (run on every rank)


def _grid(rank, world, backend):
    if backend == "triton":  # the interpreter is slow: on 2 ranks every op and variant with each mask and
        # reduction once (12 cases), on 3 ranks every op and variant once
        settings = itertools.cycle(itertools.product(MASKS, REDUCTIONS))
        cases = [(op, variant, *next(settings)) for (op, variant) in OPS * (3 if world == 2 else 1)]
    else:
        cases = [(op, variant, mask, reduction) for (op, variant) in OPS for mask in MASKS for reduction in REDUCTIONS]
    for op, variant, mask, reduction in cases:
        _check_case(rank, world, op, variant, backend, mask, reduction)


def _modules(rank, world):
    """The nn.Module wrappers hold the group and give the functional op's value."""
    sizes = SHARDS[world]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    student, teacher, mask, _ = _inputs("bool", seed=1)
    s, t, m = student[:, start:stop], teacher[:, start:stop], mask[:, start:stop]
    group = dist.group.WORLD
    module = TemperedKL(TAU_STUDENT, TAU_TEACHER, backend="torch", process_group=group)
    want = tempered_kl(student, teacher, frames=3, tau_student=TAU_STUDENT, tau_teacher=TAU_TEACHER, query_mask=mask)
    _close("TemperedKL", module(s, t, frames=3, query_mask=m), want, 1e-10)
    module = RelationDistance(variant="spatial", backend="torch", process_group=group)
    want = relation_distance(student, teacher, frames=3, variant="spatial", query_mask=mask)
    _close("RelationDistance", module(s, t, frames=3, query_mask=m), want, 1e-10)


def _empty_and_deterministic(rank, world):
    """A mask that keeps nothing on some rank (and nowhere) and repeated calls giving the same bits."""
    sizes = SHARDS[world]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    student, teacher, mask, _ = _inputs("float", seed=2)
    mask[:, : sizes[0]] = 0.0  # rank 0 keeps no query
    s = student[:, start:stop].clone().requires_grad_()
    t, m = teacher[:, start:stop], mask[:, start:stop]
    runs = []
    for _ in range(2):
        s.grad = None
        value = tempered_kl(s, t, frames=3, query_mask=m, backend="torch", process_group=dist.group.WORLD)
        value.backward()
        runs.append((value.detach().clone(), s.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "not deterministic"
    want = tempered_kl(student, teacher, frames=3, query_mask=mask, backend="torch")
    _close("rank 0 keeps nothing", runs[0][0], want, 1e-10)
    empty = torch.zeros_like(m)
    s.grad = None
    value = relation_distance(s, t, frames=3, query_mask=empty, backend="torch", process_group=dist.group.WORLD)
    value.backward()
    assert value.item() == 0.0 and not s.grad.any(), "an empty global mask must give 0 and zero gradients"


def _expect_error(fn, *fragments):
    start = time.monotonic()
    try:
        fn()
    except (TypeError, ValueError) as error:
        message = str(error)
        missing = [fragment for fragment in fragments if fragment not in message]
        assert not missing, f"error {message!r} lacks {missing}"
        assert time.monotonic() - start < 20, "the error took too long (a collective timeout is 60 s)"
        return message
    raise AssertionError(f"no error raised; expected one mentioning {fragments}")


def _bad_input(rank, world):
    """Mismatched frames, channels or mask kind, and a local error on one rank: the same error on every rank."""
    group = dist.group.WORLD
    sizes = SHARDS[world]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    student, teacher, mask, _ = _inputs("bool")
    s, t, m = student[:, start:stop], teacher[:, start:stop], mask[:, start:stop]
    messages = []
    frames = 5 if rank == world - 1 else 3
    messages.append(
        _expect_error(
            lambda: tempered_kl(s, t, frames=frames, process_group=group), "frames", "every rank", "rank 0: 3"
        )
    )
    wider = torch.cat([s, s[..., :1]], dim=-1) if rank == 1 else s
    messages.append(
        _expect_error(
            lambda: relation_distance(wider, t, frames=3, process_group=group), "student channels Cs", "every rank"
        )
    )
    local_mask = m if rank == 0 else m.double()
    messages.append(
        _expect_error(lambda: tempered_kl(s, t, frames=3, query_mask=local_mask, process_group=group), "query_mask")
    )
    bad_tau = -1.0 if rank == 1 else 0.1
    messages.append(
        _expect_error(
            lambda: tempered_kl(s, t, frames=3, tau_student=bad_tau, process_group=group), "rank 1", "tau_student"
        )
    )
    messages.append(_expect_error(lambda: tempered_kl(s, t, frames=4, process_group=group), "divisor", "N=15"))
    messages.append(_expect_error(lambda: tempered_kl(s, t, process_group=group), "frames is required"))
    # Every rank raised the same messages.
    gathered = [None] * world
    dist.all_gather_object(gathered, messages, group=group)
    assert all(other == messages for other in gathered), f"ranks raised different errors: {gathered}"
    # The group still works after the errors: nothing is left half-done.
    tempered_kl(s, t, frames=3, process_group=group, backend="torch")


def _contract(rank, world):
    _modules(rank, world)
    _empty_and_deterministic(rank, world)
    _bad_input(rank, world)


WORKERS = {
    "reference+torch": lambda rank, world: (_grid(rank, world, "reference"), _grid(rank, world, "torch")),
    "triton": lambda rank, world: _grid(rank, world, "triton"),
    "contract": _contract,
}


def _worker(rank, world, rendezvous, name):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip
    try:
        WORKERS[name](rank, world)
    except BaseException as error:  # the parent reports the first rank's traceback
        raise AssertionError(f"rank {rank}: {traceback.format_exc()}") from error
    finally:
        dist.destroy_process_group()
    # gloo's worker threads drop their finished collectives' tensors after the caller's wait returns, which takes the
    # GIL: one that asks for it while the interpreter finalises aborts the process (pytorch/pytorch#38228) although
    # the rank passed. Leave without finalising.
    os._exit(0)


def _spawn(name: str, world: int, deadline_s: float) -> None:
    # A file rendezvous: no TCP port to pick, so no race with other processes for one.
    with tempfile.TemporaryDirectory() as folder:
        context = mp.spawn(_worker, args=(world, os.path.join(folder, "rendezvous"), name), nprocs=world, join=False)
        start = time.monotonic()
        while not context.join(timeout=1.0):
            if time.monotonic() - start > deadline_s:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{name} on {world} processes did not finish within {deadline_s} s (a hang)")


WORLDS = (2, 3)
TRITON = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_matches_one_process_and_truth(world):
    """Reference and torch backends in fp64: every op and variant, mask kind and reduction."""
    _spawn("reference+torch", world, deadline_s=600)


@TRITON
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_triton_matches_one_process_and_truth(world):
    """The Triton backend (the interpreter on CPU) in fp32, against the one-process op and the fp64 truth."""
    _spawn("triton", world, deadline_s=600)


@pytest.mark.parametrize("world", WORLDS)
def test_modules_empty_mask_determinism_and_bad_input(world):
    """The modules hold the group; empty masks; same bits twice; bad input raises the same error on every rank."""
    _spawn("contract", world, deadline_s=300)


def test_process_group_needs_initialised_distributed():
    student = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        tempered_kl(student, student, frames=2, process_group=object())


def test_bench_shards_reports_bytes_sent(tmp_path):
    """`python -m bench --shards 1,2`: one row per P beside the one-process op; the bytes each rank sends follow
    the formula of docs/distributed.md (descriptor, key gather, loss sums; backward: the gradient all-to-all)."""
    from bench.cli import main
    from stss_kernels._core.sharding import DESCRIPTOR_BYTES

    argv = "--op relation_distance --variant spatial --shards 1,2 --modes fwd+bwd --batch 1 --frames 4 --hw 10 --cs 8"
    argv = [*argv.split(), "--ct", "6", "--min-runs", "1", "--min-time", "0", "--out", str(tmp_path)]
    result = main(argv)
    key_bytes = 1 * 20 * (8 + 6) * 4  # B x largest shard x (Cs + Ct) x fp32, sent once to the other rank
    rows = result["shards"]["fwd+bwd"]["rows"]
    assert [row["shards"] for row in rows] == [None, 1, 2]
    assert [row["max_sent_bytes"] for row in rows[:2]] == [0, 0]
    assert [rank["tokens"] for rank in rows[2]["ranks"]] == [20, 20]
    for rank in rows[2]["ranks"]:
        # forward: descriptor, keys, the loss's sum (one fp32); backward: the key gradients
        assert rank["sent_bytes"] == DESCRIPTOR_BYTES + key_bytes + 4 + key_bytes
        assert rank["ms"]["median"] > 0
    assert result["paths"][0].exists()
