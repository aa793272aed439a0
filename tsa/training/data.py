"""Video-caption datasets: CogVideo layout or CSV, PyAV decoding, and the tiny preset's synthetic clips."""

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tsa.errors import UsageError


class UndecodableVideoWarning(UserWarning):
    """A video was skipped because it could not be decoded."""


class VideoDecodeError(RuntimeError):
    """A video file is missing, unreadable, or has no decodable frames."""


@dataclass(frozen=True)
class VideoCaption:
    video: Path
    caption: str


def load_video_captions(data, video_column="video", caption_column="caption"):
    """Read a dataset listing: a folder with prompts.txt + videos.txt (one entry per line) or a CSV file
    with `video_column` and `caption_column`. Video paths are relative to the folder holding the listing.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"dataset not found: {data} (expected a folder with prompts.txt and "
                                "videos.txt, or a CSV file)")
    if data.is_dir():
        prompts_file, videos_file = data / "prompts.txt", data / "videos.txt"
        for listing in (prompts_file, videos_file):
            if not listing.is_file():
                raise FileNotFoundError(f"dataset folder {data} has no {listing.name}")
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        videos = [line.strip() for line in videos_file.read_text().splitlines() if line.strip()]
        if len(prompts) != len(videos):
            raise ValueError(f"dataset {data}: prompts.txt has {len(prompts)} entries but videos.txt has "
                             f"{len(videos)}")
        root, pairs = data, zip(videos, prompts)
    else:
        with data.open(newline="") as handle:
            reader = csv.DictReader(handle)
            for column in (video_column, caption_column):
                if column not in (reader.fieldnames or []):
                    raise ValueError(f"dataset {data}: no column {column!r} (columns: {reader.fieldnames})")
            rows = list(reader)
        root, pairs = data.parent, ((row[video_column], row[caption_column]) for row in rows)
    samples = [VideoCaption(root / video, caption.strip()) for video, caption in pairs if video.strip()]
    if not samples:
        raise ValueError(f"dataset {data} is empty")
    return samples


def _frame_count(container, stream):
    if stream.frames:
        return stream.frames
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def _covering_size(height, width, target_height, target_width):
    scale = max(target_height / height, target_width / width)
    return max(target_height, round(height * scale)), max(target_width, round(width * scale))


class ClipTooShortError(UsageError):
    """A clip holds fewer frames than --num-frames at --fps asks for (never padded silently)."""


FRAME_SAMPLING = ("fps", "spread")  # consecutive frames at a target frame rate, or spread over the whole clip
CLIP_START = ("first", "random")


def clip_frame_indices(total: int, source_fps: float, num_frames: int, target_fps: float, start: int = 0) -> list[int]:
    """Source frame indices of `num_frames` consecutive frames at `target_fps` from a clip at `source_fps`,
    starting at source frame `start`: frame i is the source frame nearest to time i / target_fps,
    start + floor(i * source_fps / target_fps + 1/2). The caller checks that the last index is < `total`."""
    step = float(source_fps) / float(target_fps)
    return [start + int(math.floor(i * step + 0.5)) for i in range(num_frames)]


def clip_span(source_fps: float, num_frames: int, target_fps: float) -> int:
    """Source frames `num_frames` frames at `target_fps` cover (last index + 1, from start 0)."""
    return clip_frame_indices(0, source_fps, num_frames, target_fps)[-1] + 1


def read_video(path, num_frames, height, width, fps=None, clip_start="first", seed=0):
    """Decode `num_frames` frames, resized to cover `height` x `width` and centre-cropped. Returns (T, 3, H, W)
    float32 in [-1, 1]. `fps` None ("spread"): frames spread evenly over the whole clip (the last frame repeated
    if it is shorter); `fps` given: consecutive frames at that rate, resampled from the clip's own rate
    (clip_frame_indices), from the first frame or (`clip_start="random"`) a start drawn from `seed`; a clip too
    short for that raises ClipTooShortError naming it. Raises VideoDecodeError when the file cannot be decoded.
    """
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            total = _frame_count(container, stream)
            if fps is None:
                wanted = np.linspace(0, max(total - 1, 0), num=min(num_frames, max(total, 1))).round()
                order = sorted(set(wanted.astype(int).tolist()))  # distinct: the spacing is at least one frame
            else:
                source_fps = float(stream.average_rate or stream.guessed_rate or 0)
                if not source_fps > 0:
                    raise VideoDecodeError(f"{path}: the stream has no frame rate")
                span = clip_span(source_fps, num_frames, fps)
                if span > total:
                    raise ClipTooShortError(
                        f"{path} is too short: {num_frames} frames at {fps:g} fps need {span} frames at its "
                        f"{source_fps:g} fps, it has {total} (lower --num-frames or --fps, or drop the clip)")
                start = 0 if clip_start == "first" else int(np.random.default_rng(seed).integers(0, total - span + 1))
                order = clip_frame_indices(total, source_fps, num_frames, fps, start)
            wanted = set(order)
            resize = _covering_size(stream.codec_context.height, stream.codec_context.width, height, width)
            decoded = {}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    decoded[index] = frame.to_ndarray(format="rgb24", height=resize[0], width=resize[1])
                    if len(decoded) == len(wanted):
                        break
    except ClipTooShortError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as error:
        raise VideoDecodeError(f"{path}: {error}") from error
    if not decoded:
        raise VideoDecodeError(f"{path}: no decodable frames")
    if fps is not None and len(decoded) < len(wanted):
        raise ClipTooShortError(f"{path} decodes {len(decoded)} of the {len(wanted)} frames its header promises")
    frames = [decoded[index] for index in order if index in decoded]
    frames += [frames[-1]] * (num_frames - len(frames))
    video = np.stack(frames)
    top, left = (video.shape[1] - height) // 2, (video.shape[2] - width) // 2
    video = video[:, top:top + height, left:left + width]
    return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class VideoCaptionDataset(torch.utils.data.Dataset):
    """Items are dicts (index, caption, pixels (T, 3, H, W) in [-1, 1]), or None (with an
    UndecodableVideoWarning naming the file) when the video cannot be decoded.
    """

    def __init__(self, samples, height, width, num_frames, fps=None, clip_start="first", seed=0):
        self.samples, self.height, self.width, self.num_frames = list(samples), height, width, num_frames
        self.fps, self.clip_start, self.seed = fps, clip_start, seed  # see read_video

    def __len__(self):
        return len(self.samples)

    def pixels(self, index, window=0):
        """(T, 3, H, W) in [-1, 1] of the clip's `window`-th window (random starts: --clip-windows), or None after
        warning when the video cannot be decoded."""
        sample = self.samples[index]
        # a window's random start depends on the run seed, the clip and the window only, so the cached latents and
        # the teacher's pixels (decoded again each step) see the same frames
        seed = self.seed * 1_000_003 + index if window == 0 else (self.seed, index, window)
        try:
            return read_video(sample.video, self.num_frames, self.height, self.width, self.fps, self.clip_start,
                              seed=seed)
        except VideoDecodeError as error:
            warnings.warn(f"skipping undecodable video {error}", UndecodableVideoWarning,
                          stacklevel=2)
            return None

    def __getitem__(self, index):
        pixels = self.pixels(index)
        if pixels is None:
            return None
        return {"index": index, "caption": self.samples[index].caption, "pixels": pixels}


# Synthetic clips for --preset tiny: coloured objects that fall and bounce, roll, slide or fly in an arc.
_COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 70), "yellow": (230, 200, 40),
            "white": (235, 235, 235)}


def _falling_bounce(t, fall_time=0.45, restitution=0.6):
    """Height below the top (1 = on the floor) of a ball dropped at t = 0 that bounces under gravity."""
    gravity = 2.0 / fall_time**2
    if t < fall_time:
        return 0.5 * gravity * t * t
    t, speed = t - fall_time, restitution * gravity * fall_time
    while t > 2.0 * speed / gravity:
        t, speed = t - 2.0 * speed / gravity, speed * restitution
    return 1.0 - (speed * t - 0.5 * gravity * t * t)


_MOTIONS = {  # normalised time -> (x, y) in [0, 1], y = 1 on the floor
    "falls and bounces on the floor": lambda t: (0.5, _falling_bounce(t)),
    "rolls from left to right": lambda t: (0.1 + 0.8 * t, 1.0),
    "slides from right to left": lambda t: (0.9 - 0.8 * t, 1.0),
    "flies across in an arc": lambda t: (0.1 + 0.8 * t, 1.0 - 3.0 * t * (1.0 - t)),
}


def _render_clip(rng, num_frames, height, width):
    colour_name = rng.choice(sorted(_COLOURS))
    shape = rng.choice(["ball", "cube"])
    motion = rng.choice(sorted(_MOTIONS))
    radius = int(rng.integers(height // 10, height // 6))
    floor = height - height // 8
    ys, xs = np.mgrid[:height, :width]
    background = np.empty((height, width, 3), np.uint8)
    background[:] = (150, 190, 230)
    background[floor:] = (110, 90, 70)
    frames = []
    for step in range(num_frames):
        fx, fy = _MOTIONS[motion](step / max(num_frames - 1, 1))
        cx = radius + fx * (width - 2 * radius)
        cy = radius + fy * (floor - 2 * radius)
        if shape == "ball":
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        else:
            inside = (abs(xs - cx) <= radius) & (abs(ys - cy) <= radius)
        frame = background.copy()
        frame[inside] = _COLOURS[colour_name]
        frames.append(frame)
    return frames, f"a {colour_name} {shape} {motion}"


def write_video(path, frames, fps=8):
    """Encode a list of (H, W, 3) uint8 frames (even H and W) as an H.264 (or MPEG-4) mp4 with PyAV."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_synthetic_dataset(root, num_videos=8, height=120, width=176, seed=0):
    """Write `num_videos` mp4 clips (6 to 24 frames, so some need padding) with their captions in the
    CogVideo layout (prompts.txt, videos.txt, videos/*.mp4) under `root`. Returns `root`.
    """
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions, videos = [], []
    for index in range(num_videos):
        frames, caption = _render_clip(rng, int(rng.integers(6, 25)), height, width)
        name = f"videos/clip_{index:03d}.mp4"
        write_video(root / name, frames)
        captions.append(caption)
        videos.append(name)
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    return root


def prepare_tiny_assets(config):
    """Fill in model_path, teacher_path and data of a tiny-preset TrainConfig (in place), building tiny random
    models and the synthetic dataset under OUTPUT_DIR/tiny the first time (call on the main process first).
    """
    from tsa import tiny
    from tsa.models import DEFAULT_FAMILY

    assets = config.output_dir / "tiny"
    if config.model_path is None:
        config.model_family = config.model_family or DEFAULT_FAMILY
        i2v = config.task == "i2v"
        config.model_path = assets / (config.model_family + ("-i2v" if i2v else ""))
        if not (config.model_path / "model_index.json").is_file():
            tiny.save_tiny_pipeline(config.model_path, family=config.model_family, **({"i2v": True} if i2v else {}))
    if config.teacher_path is None:
        config.teacher_path = assets / config.teacher
        if not (config.teacher_path / "config.json").is_file():
            builders = {"videomae": tiny.tiny_videomae, "dinov2": tiny.tiny_dinov2, "vjepa2": tiny.tiny_vjepa2}
            builders[config.teacher](config.teacher_path)
    if config.data is None:
        config.data = assets / "data"
        if not (config.data / "videos.txt").is_file():
            write_synthetic_dataset(config.data, num_videos=config.num_videos)
    return config
