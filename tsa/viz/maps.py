"""The correspondence distributions TSA aligns, teacher against student.

For a query token i of frame K and a target frame f, TSA compares the teacher's tempered correspondence
distribution P_t[i, f] = softmax(T[i, f-block] / tau_t) over frame f's positions (T the cosine
self-similarity of the teacher's tokens) with the student's P_s[i, f]. This module computes those
maps and their per-frame KL from features on the alignment grid (`correspondence_maps`), gets the
features of a clip through the training objective itself (`clip_alignment`: a forward pre-hook on the
objective's alignment loss records exactly the student / teacher features and the M-TSA video the loss
receives) and picks queries (`select_queries`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tsa.losses import check_feature_pair, tubelet_for_grid
from tsa.masks import motion_query_mask, motion_saliency

DEFAULT_TIMESTEP = 500
MAX_COLUMNS = 8


@dataclass
class CorrespondenceMaps:
    """P_t and P_s of a few queries on a few target frames (numpy, float64).

    queries (Q, 3) int: (frame, row, col) on the alignment grid; frames (Fs,) int: the target frames;
    teacher, student (B, Q, Fs, H, W): each map sums to 1 over its frame's H*W positions;
    kl (B, Q, Fs): KL(P_t || P_s) per target frame.
    """

    queries: np.ndarray
    frames: np.ndarray
    teacher: np.ndarray
    student: np.ndarray
    kl: np.ndarray
    tau_student: float
    tau_teacher: float

    def entropy(self, which: str = "teacher") -> np.ndarray:
        """(B, Q, Fs) entropy (nats) of the teacher's or the student's maps."""
        maps = {"teacher": self.teacher, "student": self.student}[which]
        flat = maps.reshape(*maps.shape[:3], -1)
        return -(flat * np.log(np.where(flat > 0, flat, 1.0))).sum(-1)


def viz_methods() -> tuple[str, ...]:
    """The --align values whose runs have a projector and a teacher to show: every registered alignment method."""
    from tsa.alignment import ALIGNMENT_METHODS

    return tuple(ALIGNMENT_METHODS)


def _check_tau(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_queries(queries, grid) -> np.ndarray:
    rows = [tuple(row) if isinstance(row, (tuple, list, np.ndarray)) else (row,) for row in queries]
    for row in rows:
        valid = len(row) == 3 and all(not isinstance(v, bool) and isinstance(v, (int, np.integer)) for v in row)
        if not valid or not all(0 <= int(v) < size for v, size in zip(row, grid)):
            raise ValueError(
                f"queries must be (frame, row, col) positions of the {'x'.join(map(str, grid))} alignment grid, "
                f"got {row!r}"
            )
    if not rows:
        raise ValueError("queries must hold at least one (frame, row, col) position, got none")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _check_frames(frames, num_frames: int) -> np.ndarray:
    if frames is None:
        return np.arange(num_frames)
    frames = list(frames)
    if not frames or any(
        isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < num_frames for f in frames
    ):
        raise ValueError(f"frames must be target frame indices in [0, {num_frames}), got {frames!r}")
    return np.asarray(frames, dtype=np.int64)


def _log_correspondences(features, query_index, frames, tau, normalize, dtype):
    """log P (B, Q, Fs, HW): softmax over each target frame of the (cosine) similarities of the queries."""
    batch, num_frames, height, width, channels = features.shape
    features = features.to(dtype)
    if normalize:
        features = F.normalize(features, dim=-1)
    queries = features.reshape(batch, -1, channels)[:, query_index]  # (B, Q, C)
    keys = features[:, frames].reshape(batch, len(frames), height * width, channels)  # (B, Fs, HW, C)
    logits = torch.einsum("bqc,bfkc->bqfk", queries, keys) / tau
    return torch.log_softmax(logits, dim=-1)


def correspondence_maps(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    queries,
    *,
    frames=None,
    tau_student: float = 0.1,
    tau_teacher: float | None = None,
    normalize: bool = True,
) -> CorrespondenceMaps:
    """P_t and P_s of `queries` on the target `frames`, from features on the alignment grid.

    student_features (B, F, H, W, Cs) and teacher_features (B, F, H, W, Ct) on the same grid (what the
    alignment loss receives); queries: (frame, row, col) grid positions; frames: target frame indices
    (None: all F). Same math as `stss_kernels.tempered_kl` (cosine similarities with `normalize`, one
    softmax per target frame, forward KL with the teacher as the target), in float64.
    """
    check_feature_pair(student_features, teacher_features)
    grid = tuple(student_features.shape[1:4])
    query_rows = _check_queries(queries, grid)
    target_frames = _check_frames(frames, grid[0])
    tau_student = _check_tau("tau_student", tau_student)
    tau_teacher = tau_student if tau_teacher is None else _check_tau("tau_teacher", tau_teacher)
    index = torch.as_tensor(np.ravel_multi_index(tuple(query_rows.T), grid), device=student_features.device)
    selected = torch.as_tensor(target_frames, device=student_features.device)
    with torch.no_grad():
        log_t = _log_correspondences(teacher_features, index, selected, tau_teacher, normalize, torch.float64)
        log_s = _log_correspondences(student_features, index, selected, tau_student, normalize, torch.float64)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    shape = (*log_t.shape[:3], *grid[1:])
    return CorrespondenceMaps(
        queries=query_rows,
        frames=target_frames,
        teacher=log_t.exp().reshape(shape).cpu().numpy(),
        student=log_s.exp().reshape(shape).cpu().numpy(),
        kl=kl.cpu().numpy(),
        tau_student=tau_student,
        tau_teacher=tau_teacher,
    )


def alignment_statistics(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    tau_student: float = 0.1,
    tau_teacher: float | None = None,
    query_mask: torch.Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 256,
) -> dict:
    """Over every query (or those of `query_mask` (B, N) bool): mean entropy of P_t and P_s, the per-frame KL
    profile (F,) and its mean (the TSA / M-TSA loss value for these features). float32, chunked over queries."""
    check_feature_pair(student_features, teacher_features)
    tau_student = _check_tau("tau_student", tau_student)
    tau_teacher = tau_student if tau_teacher is None else _check_tau("tau_teacher", tau_teacher)
    batch, num_frames = student_features.shape[:2]
    num_tokens = math.prod(student_features.shape[1:4])
    device = student_features.device
    weight = torch.ones(batch, num_tokens, device=device) if query_mask is None else query_mask.to(device).float()
    frames = torch.arange(num_frames, device=device)
    totals = {"entropy_teacher": 0.0, "entropy_student": 0.0}
    kl_profile = torch.zeros(num_frames, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, num_tokens, chunk_size):
            index = torch.arange(start, min(start + chunk_size, num_tokens), device=device)
            w = weight[:, index, None]  # (B, Q, 1)
            log_t = _log_correspondences(teacher_features, index, frames, tau_teacher, normalize, torch.float32)
            log_s = _log_correspondences(student_features, index, frames, tau_student, normalize, torch.float32)
            p_t, p_s = log_t.exp(), log_s.exp()
            totals["entropy_teacher"] += float((-(p_t * log_t).sum(-1) * w).sum())
            totals["entropy_student"] += float((-(p_s * log_s).sum(-1) * w).sum())
            kl_profile += ((p_t * (log_t - log_s)).sum(-1) * w).sum((0, 1)).double()
    count = float(weight.sum())
    if count == 0:
        return {"entropy_teacher": 0.0, "entropy_student": 0.0, "kl_per_frame": np.zeros(num_frames), "kl": 0.0}
    profile = (kl_profile / count).cpu().numpy()
    return {
        "entropy_teacher": totals["entropy_teacher"] / (count * num_frames),
        "entropy_student": totals["entropy_student"] / (count * num_frames),
        "kl_per_frame": profile,
        "kl": float(profile.mean()),
    }


@dataclass
class ClipAlignment:
    """What the alignment loss sees for one clip, on the alignment grid (F, H, W).

    student (B, F, H, W, Cs) projected transformer features; teacher (B, F, H, W, Ct); saliency
    (B, F, H, W) M-TSA motion saliency; mask (B, F, H, W) bool M-TSA query mask (top_k per frame);
    images (B, F, 3, Hp, Wp) in [-1, 1]: the pixel frame under each grid frame (pixel frame 0 dropped
    when the teacher drops it); top_k the mask's fraction; timestep the diffusion timestep used.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    saliency: torch.Tensor
    mask: torch.Tensor
    images: torch.Tensor
    top_k: float
    timestep: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.student.shape[1:4])


def _motion_video(teacher, pixels, grid):
    """The pixel video M-TSA reads its mask from when the loss did not receive one (TSA, TRD, REPA runs):
    as in AlignmentObjective, pixel frame 0 dropped with the teacher's, resized to grid x the teacher's patch."""
    from tsa.teachers.base import resize_video

    size = [cells * patch for cells, patch in zip(grid, teacher.patch_size)]
    return resize_video(pixels[:, int(teacher.drop_first_frame) :], *size)


def clip_alignment(
    objective,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pixels: torch.Tensor,
    *,
    timestep: int = DEFAULT_TIMESTEP,
    seed: int = 0,
    top_k: float | None = None,
    condition: dict | None = None,
) -> ClipAlignment:
    """Run the objective on one batch (no grad, fixed timestep and noise) and keep what its alignment loss gets.

    objective: an `AlignmentObjective` with a teacher (align tsa / mtsa / trd / repa), unwrapped from DDP;
    latents (B, F, C, h, w) clean latents normalised as the model family does, prompt_embeds (B, L, D),
    pixels (B, T, 3, H, W) in [-1, 1].
    top_k defaults to the objective's M-TSA fraction (0.2 for the other methods); `condition`: an image-to-video
    model's first-frame condition (ModelFamily.image_condition).
    """
    loss = getattr(objective, "alignment_loss", None)
    if loss is None:
        raise ValueError(
            f"the objective (align={getattr(objective, 'align', None)!r}) has no teacher alignment "
            f"to show; runs with align in {viz_methods()} have one"
        )
    top_k = getattr(loss, "top_k", 0.2) if top_k is None else top_k
    captured = {}

    def record(module, args, kwargs):
        captured.update(student=args[0], teacher=args[1], video=kwargs.get("video", args[2] if len(args) > 2 else None))

    generator = torch.Generator(device=latents.device).manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.full((latents.shape[0],), int(timestep), device=latents.device)  # the family casts it
    handle = loss.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            objective(latents, prompt_embeds, pixels, timesteps=timesteps, noise=noise, condition=condition)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the objective's forward did not call its alignment loss: nothing to show")
    student, teacher = captured["student"].detach(), captured["teacher"].detach()
    grid = tuple(student.shape[1:4])
    video = captured["video"]
    if video is None:
        video = _motion_video(objective.teacher, pixels.to(student.device), grid)
    tubelet = tubelet_for_grid(video, grid)
    saliency = motion_saliency(video, tubelet)
    mask = motion_query_mask(video, tubelet, top_k).view(saliency.shape)
    images = _frames_under_grid(pixels, grid[0], int(objective.teacher.drop_first_frame))
    return ClipAlignment(student, teacher, saliency, mask, images, float(top_k), int(timestep))


def _frames_under_grid(pixels, num_frames, drop_first):
    """The pixel frame nearest to the middle of each grid frame's time span: (B, F, 3, H, W)."""
    from tsa.teachers.base import resize_video

    pixels = pixels[:, drop_first:] if pixels.shape[1] > drop_first else pixels
    return resize_video(pixels, num_frames, *pixels.shape[-2:]).detach().float().cpu()


def select_queries(saliency: torch.Tensor, *, query_frame: int | None = None, count: int = 2) -> list:
    """Default queries: the `count` most dynamic tokens (M-TSA saliency (F, H, W)) of the query frame (default: the
    middle one), then its centre token. Returns [(frame, row, col), ...] without repeats."""
    num_frames, height, width = saliency.shape
    frame = num_frames // 2 if query_frame is None else query_frame
    if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < num_frames:
        raise ValueError(f"query_frame must be in [0, {num_frames}), got {query_frame!r}")
    order = torch.argsort(saliency[frame].flatten().float(), descending=True, stable=True)[:count].tolist()
    queries = [(frame, index // width, index % width) for index in order]
    centre = (frame, height // 2, width // 2)
    return queries + ([centre] if centre not in queries else [])


def pixel_to_grid(points, image_size, grid) -> list:
    """(x, y) pixel positions in a (height, width) frame -> (row, col) cells of a (H, W) grid over that frame."""
    (height, width), (rows, cols) = image_size, grid
    return [(min(int(y * rows / height), rows - 1), min(int(x * cols / width), cols - 1)) for x, y in points]


def default_columns(num_frames: int, query_frame: int, max_columns: int = MAX_COLUMNS) -> list:
    """All target frames, or `max_columns` of them evenly spaced, the query frame always included."""
    if num_frames <= max_columns:
        return list(range(num_frames))
    picked = set(np.linspace(0, num_frames - 1, max_columns - 1).round().astype(int).tolist()) | {query_frame}
    return sorted(picked)
