"""The latent cache: entry contents, keys (resolution / model / prompt), cache hits skip the VAE, sharding."""

import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tsa.tiny import save_tiny_pipeline
from tsa.training.cache import (CachedLatentDataset, CacheLayout, LatentEncoder, fill_cache, model_fingerprint,
                                publish_cache)
from tsa.training.data import UndecodableVideoWarning, VideoCaptionDataset, load_video_captions, write_synthetic_dataset

HEIGHT, WIDTH, FRAMES = 32, 32, 9


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = save_tiny_pipeline(root / "model")
    data = write_synthetic_dataset(root / "data", num_videos=4, height=40, width=56)
    return model, data


@pytest.fixture(scope="module")
def encoder(assets):
    return LatentEncoder(assets[0])


@pytest.fixture(scope="module")
def filled(assets, encoder, tmp_path_factory):
    """A cache root holding every video of the dataset at HEIGHT x WIDTH x FRAMES."""
    model, data = assets
    root = tmp_path_factory.mktemp("filled")
    assert fill_cache(videos_of(data), make_layout(root, model), encoder, progress=False) == (4, 0)
    return root


def make_layout(root, model, **changes):
    layout = CacheLayout(root, HEIGHT, WIDTH, FRAMES, model_fingerprint(model), 226)
    return replace(layout, **changes)


def videos_of(data, height=HEIGHT, width=WIDTH, frames=FRAMES):
    return VideoCaptionDataset(load_video_captions(data), height, width, frames)


def test_entry_holds_latent_distribution_and_prompt(assets, encoder, filled):
    model, data = assets
    videos, layout = videos_of(data), make_layout(filled, model)
    sample = videos.samples[1]
    entry = load_file(layout.path(sample))
    pixels = videos.pixels(1)
    with torch.no_grad():
        expected = encoder.pipe.vae.encode(pixels.permute(1, 0, 2, 3)[None]).latent_dist.parameters[0]
        embeds, _ = encoder.pipe.encode_prompt(sample.caption, do_classifier_free_guidance=False)
    assert entry["latent_dist"].shape == (2 * 4, 3, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(entry["latent_dist"], expected)
    torch.testing.assert_close(entry["prompt_embeds"], embeds[0])
    mask = entry["prompt_mask"]
    assert mask.shape == (226,) and mask.dtype == torch.bool and 1 < mask.sum() < 226 and mask[0]


def test_cache_hit_skips_the_vae(assets, filled, tmp_path):
    model, data = assets
    shutil.copytree(filled, tmp_path, dirs_exist_ok=True)
    videos, layout = videos_of(data), make_layout(tmp_path, model)

    def broken_vae(*args, **kwargs):
        raise AssertionError("the VAE ran on a cache hit")

    encoder = LatentEncoder(model)
    encoder.pipe.vae.encode = broken_vae
    assert fill_cache(videos, layout, encoder, progress=False) == (0, 4)
    loader_calls = []
    assert fill_cache(videos, layout, lambda: loader_calls.append(1), progress=False) == (0, 4)
    assert not loader_calls, "a full cache must not even load the encoder"
    # A new resolution is a miss: the (broken) VAE runs.
    with pytest.raises(AssertionError, match="cache hit"):
        fill_cache(videos_of(data, height=48), make_layout(tmp_path, model, height=48), encoder, progress=False)


def test_keys_change_with_resolution_frames_model_and_prompt(assets, tmp_path):
    model, data = assets
    sample = videos_of(data).samples[0]
    layout = make_layout(tmp_path, model)
    paths = {
        layout.path(sample),
        make_layout(tmp_path, model, height=48).path(sample),
        make_layout(tmp_path, model, num_frames=13).path(sample),
        make_layout(tmp_path, model, max_sequence_length=64).path(sample),
        make_layout(tmp_path, model, dtype="bfloat16").path(sample),
        make_layout(tmp_path, model, tiling=True).path(sample),
        layout.path(replace(sample, caption=sample.caption + " slowly")),
    }
    assert len(paths) == 7
    assert layout.path(sample) == make_layout(tmp_path, model).path(sample)
    assert sample.video.stem in layout.path(sample).name
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    before = model_fingerprint(model)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert model_fingerprint(model) != before, "new VAE weights must give a new cache key"
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_sharded_fill_covers_every_video_once(assets, encoder, tmp_path):
    model, data = assets
    videos, layout = videos_of(data), make_layout(tmp_path, model)
    assert fill_cache(videos, layout, encoder, process_index=1, num_processes=3, progress=False) == (1, 0)
    # A shard's entries wait in the staging folder until every process is done (publish_cache).
    assert not layout.directory.exists()
    assert [(layout.staging / layout.path(s).name).is_file() for s in videos.samples] == [False, True, False, False]
    assert fill_cache(videos, layout, encoder, process_index=0, num_processes=3, progress=False) == (2, 0)
    assert fill_cache(videos, layout, encoder, process_index=2, num_processes=3, progress=False) == (1, 0)
    publish_cache(layout)
    assert all(layout.path(s).is_file() for s in videos.samples) and not layout.staging.exists()


def test_undecodable_video_is_left_out_of_the_training_set(assets, filled, encoder, tmp_path):
    model, data = assets
    shutil.copytree(filled, tmp_path, dirs_exist_ok=True)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"garbage" * 100)
    videos = videos_of(data)
    videos.samples.insert(2, replace(videos.samples[0], video=broken, caption="a broken clip"))
    layout = make_layout(tmp_path, model)
    with pytest.warns(UndecodableVideoWarning, match="broken.mp4"):
        assert fill_cache(videos, layout, encoder, progress=False) == (0, 4)
    dataset = CachedLatentDataset(videos, layout, with_pixels=True)
    assert dataset.indices == [0, 1, 3, 4] and dataset.skipped_videos == [broken]
    item = dataset[2]
    assert set(item) == {"latent_dist", "prompt_embeds", "prompt_mask", "pixels"}
    assert item["pixels"].shape == (FRAMES, 3, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="no video"):
        CachedLatentDataset(videos, make_layout(tmp_path, model, height=64))


def test_a_cached_video_that_stops_decoding_is_replaced_by_the_next_one(assets, encoder, tmp_path):
    model, data = assets
    shutil.copytree(data, tmp_path / "data")
    videos = videos_of(tmp_path / "data")
    layout = make_layout(tmp_path / "cache", model)
    assert fill_cache(videos, layout, encoder, progress=False) == (4, 0)
    dataset = CachedLatentDataset(videos, layout, with_pixels=True)
    expected = dataset[2]
    # Rewriting the clip changes its mtime (its cache key) and breaks decoding: the paths were fixed at build time.
    videos.samples[1].video.write_bytes(b"garbage" * 100)
    with pytest.warns(UndecodableVideoWarning, match=videos.samples[1].video.name):
        item = dataset[1]
    for key, value in expected.items():
        torch.testing.assert_close(item[key], value, rtol=0, atol=0)
    assert set(dataset[0]) == {"latent_dist", "prompt_embeds", "prompt_mask", "pixels"}
