"""The latent cache: VAE latent distributions and text-encoder prompt embeddings written once as safetensors.

An entry's file name carries the video (name plus a digest of its path, size and modification time), the
resolution and frame count, a fingerprint of the VAE / text encoder / tokenizer files, the encode dtype and
VAE tiling, and a hash of the prompt, so changing any of them makes a new entry instead of reusing a stale one.
`tsa-cache` (precompute_cache, or `tsa-train --precompute`) fills the cache, sharded over accelerate's processes.
"""

import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tsa.errors import DataError
from tsa.training.data import UndecodableVideoWarning, VideoCaptionDataset, load_video_captions

ENCODER_SUBFOLDERS = ("vae", "text_encoder", "tokenizer")


def precision_dtype(mixed_precision):
    """torch dtype of the frozen models for accelerate's mixed_precision ("no", "fp16", "bf16")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def _digest(*parts, length=10):
    return hashlib.sha256("\0".join(str(part) for part in parts).encode()).hexdigest()[:length]


def model_fingerprint(model_path):
    """Digest of the name, size and modification time of every VAE, text encoder and tokenizer file."""
    model_path = Path(model_path)
    files = sorted(path for sub in ENCODER_SUBFOLDERS for path in (model_path / sub).rglob("*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"--model-path {model_path} has no {'/'.join(ENCODER_SUBFOLDERS)} subfolders")
    return _digest(*(f"{path.relative_to(model_path)}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
                     for path in files))


@dataclass(frozen=True)
class CacheLayout:
    """Where the entry of a (video, caption) pair lives for one resolution / frame count / model / encode
    dtype ("float32", "bfloat16", ...) and VAE tiling."""

    root: Path
    height: int
    width: int
    num_frames: int
    model: str
    max_sequence_length: int
    dtype: str = "float32"
    tiling: bool = False
    frames: str = "spread"  # how frames are taken from a clip: "spread", or "fps{rate}-{first|random}{seed}"
    task: str = "t2v"  # "i2v" entries also hold the first-frame condition

    @property
    def directory(self):
        encode = self.dtype + ("-tiled" if self.tiling else "")
        frames = ("" if self.frames == "spread" else f"-{self.frames}") + ("-i2v" if self.task == "i2v" else "")
        return self.root / (f"{self.num_frames}x{self.height}x{self.width}{frames}-{self.model}"
                            f"-t{self.max_sequence_length}-{encode}")

    @property
    def staging(self):
        """Where a fill writes new entries until every process is done (publish_cache moves them into
        `directory`), so an interrupted or failed fill leaves no half-built cache folder."""
        return self.directory.with_name(self.directory.name + ".filling")

    def path(self, sample, window=0):
        """The entry of a clip's `window`-th window (random starts, --clip-windows; window 0 is the only one
        otherwise)."""
        stat = sample.video.stat() if sample.video.exists() else None
        video = _digest(sample.video.resolve(), stat and stat.st_size, stat and stat.st_mtime_ns, length=8)
        suffix = f"-w{window}" if window else ""
        return self.directory / f"{sample.video.stem}-{video}-{_digest(sample.caption)}{suffix}.safetensors"


def cache_layout(config, dtype):
    """The CacheLayout of a TrainConfig, encoding in `dtype`."""
    from tsa.models import detect_family

    frames = "spread"
    if config.frame_sampling == "fps":
        frames = f"fps{config.fps:g}-" + ("first" if config.clip_start == "first" else f"random{config.seed}")
    return CacheLayout(Path(config.cache_dir), config.height, config.width, config.num_frames,
                       model_fingerprint(config.model_path), detect_family(config.model_path).max_sequence_length(
                           config.model_path), str(dtype).removeprefix("torch."), config.vae_tiling, frames,
                       config.task or "t2v")


class LatentEncoder:
    """The frozen VAE and text encoder of a pipeline folder (any supported family), turning a clip and caption
    into a cache entry. `max_sequence_length` None takes the family's (CogVideoX 226, Wan 512)."""

    def __init__(self, model_path, device="cpu", dtype=torch.float32, max_sequence_length=None, tiling=False,
                 family=None):
        from tsa.models import detect_family

        self.family = detect_family(model_path) if family is None else family
        self.pipe = self.family.load_encoders(model_path, device, dtype, tiling)
        if max_sequence_length is None:
            max_sequence_length = self.family.max_sequence_length(model_path)
        self.device, self.dtype, self.max_sequence_length = torch.device(device), dtype, max_sequence_length

    def __call__(self, pixels, caption):
        """pixels (T, 3, H, W) in [-1, 1] -> the family's cache entry (ModelFamily.encode_entry): latent_dist
        (2C, F, h, w), prompt_embeds (L, D), prompt_mask (L,)."""
        return self.family.encode_entry(self.pipe, pixels, caption, self.max_sequence_length)


def fill_cache(dataset, layout, encoder, process_index=0, num_processes=1, progress=True, windows=1):
    """Encode this process's shard (items i with i % num_processes == process_index, an item being a clip's
    window: `windows` per clip) of a VideoCaptionDataset that has no entry yet. `encoder` is a LatentEncoder or a
    callable returning one (only called on the first miss, so a full cache never loads the VAE). Undecodable
    videos are skipped with a warning (the VAE loads only once a clip decodes). New entries go to layout.staging;
    a one-process fill publishes them into layout.directory when done (build_cache does it after every process is
    done). Returns (number encoded, number already cached)."""
    items = [(index, window) for index in range(len(dataset)) for window in range(windows)]
    encoded = hits = 0
    undecodable = set()
    shard = items[process_index::num_processes]
    for index, window in tqdm(shard, desc=f"caching latents [{process_index}]", disable=not progress):
        target = layout.path(dataset.samples[index], window)
        if target.is_file():
            hits += 1
            continue
        if index in undecodable:
            continue
        pixels = dataset.pixels(index, window)
        if pixels is None:
            undecodable.add(index)
            continue
        if not isinstance(encoder, LatentEncoder):
            encoder = encoder()
        entry = encoder(pixels, dataset.samples[index].caption)
        layout.staging.mkdir(parents=True, exist_ok=True)
        _save_atomically(entry, layout.staging / target.name, {"video": str(dataset.samples[index].video),
                                                               "caption": dataset.samples[index].caption})
        encoded += 1
    if num_processes == 1:
        publish_cache(layout)
    return encoded, hits


def publish_cache(layout):
    """Move the complete entries of layout.staging into layout.directory and remove the staging folder (call
    on one process, once every process has finished filling)."""
    if not layout.staging.is_dir():
        return
    entries = sorted(layout.staging.glob("*.safetensors"))
    if entries:
        layout.directory.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        entry.replace(layout.directory / entry.name)
    shutil.rmtree(layout.staging, ignore_errors=True)


def _save_atomically(tensors, target, metadata):
    from safetensors.torch import save_file

    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    save_file(tensors, partial, metadata=metadata)
    partial.replace(target)


class CachedLatentDataset(torch.utils.data.Dataset):
    """The cached entries of a VideoCaptionDataset: dicts of latent_dist, prompt_embeds, prompt_mask and,
    with `with_pixels`, the decoded clip for the teacher. Entry paths are fixed when the dataset is built.
    With `windows` > 1 (random windows per clip) a clip counts when every window is cached and `set_epoch(e)`
    picks window e % windows for every clip. A clip that no longer decodes is replaced, with a warning, by the
    next cached one that does, so every process always gets full batches."""

    def __init__(self, videos, layout, with_pixels=False, windows=1):
        self.videos, self.with_pixels, self.windows, self.window = videos, with_pixels, windows, 0
        paths = [[layout.path(sample, window) for window in range(windows)] for sample in videos.samples]
        self.indices = [index for index, clip in enumerate(paths) if all(path.is_file() for path in clip)]
        self.paths = [paths[index] for index in self.indices]
        cached = set(self.indices)
        self.skipped_videos = [sample.video for index, sample in enumerate(videos.samples) if index not in cached]
        if not self.indices:
            tried = [str(video) for video in self.skipped_videos]
            shown = ", ".join(tried[:5]) + (f" and {len(tried) - 5} more" if len(tried) > 5 else "")
            raise DataError(f"no video of the dataset decodes (tried {shown}); nothing was cached or trained")

    def __len__(self):
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Train on window epoch % windows of every clip from now on (the training loop calls it each epoch)."""
        self.window = epoch % self.windows

    def __getitem__(self, position):
        from safetensors.torch import load_file

        if not self.with_pixels:
            return load_file(self.paths[position][self.window])
        for offset in range(len(self)):
            candidate = (position + offset) % len(self)
            pixels = self.videos.pixels(self.indices[candidate], self.window)
            if pixels is not None:
                break
            warnings.warn(f"{self.videos.samples[self.indices[candidate]].video} no longer decodes: training on "
                          f"the next cached video instead", UndecodableVideoWarning, stacklevel=2)
        else:
            raise RuntimeError("none of the cached videos decodes any more")
        return {**load_file(self.paths[candidate][self.window]), "pixels": pixels}


def collate_entries(items):
    """Stack a list of entry dicts into one batch dict."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _family_for_task(config):
    """The folder's family, encoding the first-frame condition when the run's task is i2v."""
    from tsa.models import detect_family

    family = detect_family(config.model_path)
    family.image_to_video = config.task == "i2v"
    return family


def build_cache(config, accelerator):
    """Fill the cache for `config` on every process of `accelerator` (sharded); returns the
    CachedLatentDataset of everything that is cached once all processes are done."""
    videos = VideoCaptionDataset(load_video_captions(config.data, config.video_column, config.caption_column),
                                 config.height, config.width, config.num_frames,
                                 config.fps if config.frame_sampling == "fps" else None, config.clip_start, config.seed)
    dtype = precision_dtype(accelerator.mixed_precision)
    layout = cache_layout(config, dtype)
    encoded, hits = fill_cache(
        videos, layout,
        lambda: LatentEncoder(config.model_path, accelerator.device, dtype, layout.max_sequence_length,
                              config.vae_tiling, family=_family_for_task(config)),
        accelerator.process_index, accelerator.num_processes, progress=accelerator.is_local_main_process,
        windows=config.clip_windows,
    )
    accelerator.free_memory()  # the VAE and T5 are not needed any more
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_cache(layout)
    accelerator.wait_for_everyone()
    from tsa.alignment import ALIGNMENT_METHODS

    method = ALIGNMENT_METHODS.get(config.align)
    try:
        dataset = CachedLatentDataset(videos, layout, with_pixels=method is not None and method.needs_pixels,
                                      windows=config.clip_windows)
    except DataError as error:
        raise DataError(f"--data {config.data}: {error}") from None
    if accelerator.is_main_process:
        skipped = len(videos) - len(dataset)
        print(f"latent cache {layout.directory}: {len(dataset)} of {len(videos)} videos cached "
              f"(process 0 encoded {encoded}, reused {hits})" + (f", {skipped} skipped" if skipped else ""))
        if skipped:
            names = ", ".join(str(video) for video in dataset.skipped_videos[:5])
            warnings.warn(f"{skipped} of {len(videos)} videos could not be decoded and are left out: {names}"
                          + (" ..." if skipped > 5 else ""), UndecodableVideoWarning, stacklevel=2)
    return dataset


def precompute_cache(config):
    """tsa-cache: fill the latent cache of config.data (resolved and checked first; shard it over processes by
    running under `accelerate launch`). Returns the CachedLatentDataset."""
    from accelerate import Accelerator

    from tsa.training.config import resolve_config
    from tsa.training.data import prepare_tiny_assets
    from tsa.training.validation import check_training_config

    config = resolve_config(config)
    check_training_config(config, needs_teacher=False, run_outputs=False)
    accelerator = Accelerator()
    if config.preset == "tiny":
        with accelerator.main_process_first():
            prepare_tiny_assets(config)
    return build_cache(config, accelerator)
