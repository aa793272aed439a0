"""Dataset listings, PyAV decoding (even sampling, padding, resize + centre crop) and the synthetic clips."""

import numpy as np
import pytest
import torch

from tsa.training.data import (
    UndecodableVideoWarning,
    VideoCaptionDataset,
    VideoDecodeError,
    load_video_captions,
    read_video,
    write_synthetic_dataset,
    write_video,
)


def gray_clip(num_frames, height=32, width=48, step=12):
    """Uniform frames whose brightness encodes the frame index (x264 keeps flat frames within +-2)."""
    return [np.full((height, width, 3), 10 + step * index, np.uint8) for index in range(num_frames)]


def frame_levels(video):
    return ((video.mean(dim=(1, 2, 3)) + 1) * 127.5).tolist()


def test_cogvideo_layout_and_csv(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red ball\n\na blue cube falls\n")
    (tmp_path / "videos.txt").write_text("v/a.mp4\n\nv/b.mp4\n")
    samples = load_video_captions(tmp_path)
    assert [(s.video, s.caption) for s in samples] == [
        (tmp_path / "v/a.mp4", "a red ball"),
        (tmp_path / "v/b.mp4", "a blue cube falls"),
    ]
    csv_file = tmp_path / "meta" / "train.csv"
    csv_file.parent.mkdir()
    csv_file.write_text('clip,text\nx.mp4,"a ball, rolling"\n')
    samples = load_video_captions(csv_file, video_column="clip", caption_column="text")
    assert [(s.video, s.caption) for s in samples] == [(tmp_path / "meta" / "x.mp4", "a ball, rolling")]


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_video_captions(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="prompts.txt"):
        load_video_captions(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n")
    (tmp_path / "videos.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_video_captions(tmp_path)
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    with pytest.raises(ValueError, match="2 entries but videos.txt has 1"):
        load_video_captions(tmp_path)
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("video,text\na.mp4,hello\n")
    with pytest.raises(ValueError, match="no column 'caption'"):
        load_video_captions(csv_file)


def test_long_clip_is_sampled_evenly(tmp_path):
    write_video(tmp_path / "long.mp4", gray_clip(17, step=12))
    video = read_video(tmp_path / "long.mp4", num_frames=5, height=32, width=48)
    assert video.shape == (5, 3, 32, 48) and video.dtype == torch.float32
    np.testing.assert_allclose(frame_levels(video), [10 + 12 * i for i in (0, 4, 8, 12, 16)], atol=3)


def test_short_clip_repeats_its_last_frame(tmp_path):
    write_video(tmp_path / "short.mp4", gray_clip(3, step=40))
    video = read_video(tmp_path / "short.mp4", num_frames=9, height=32, width=48)
    np.testing.assert_allclose(frame_levels(video), [10, 50, 90] + [90] * 6, atol=3)


def test_resize_covers_then_centre_crops(tmp_path):
    # 64 x 128 clip: left quarter black, middle half white, right quarter black. Covering 32 x 32 resizes to
    # 32 x 64 and keeps the middle 32 columns: white (the outermost columns blend a little black in).
    frame = np.zeros((64, 128, 3), np.uint8)
    frame[:, 32:96] = 255
    write_video(tmp_path / "wide.mp4", [frame] * 2)
    video = read_video(tmp_path / "wide.mp4", num_frames=1, height=32, width=32)
    assert video.shape == (1, 3, 32, 32)
    assert video[..., 2:-2].min() > 0.9 and video.min() > 0.5
    # Not cropped: the black borders are there.
    assert read_video(tmp_path / "wide.mp4", num_frames=1, height=32, width=64)[..., :4].max() < -0.9


def test_undecodable_videos_are_skipped_and_named(tmp_path):
    write_synthetic_dataset(tmp_path, num_videos=2, height=32, width=48)
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00not an mp4" * 50)
    with (tmp_path / "videos.txt").open("a") as listing:
        listing.write("videos/broken.mp4\nvideos/missing.mp4\n")
    with (tmp_path / "prompts.txt").open("a") as listing:
        listing.write("a broken clip\na missing clip\n")
    dataset = VideoCaptionDataset(load_video_captions(tmp_path), height=32, width=32, num_frames=5)
    with pytest.warns(UndecodableVideoWarning) as caught:
        items = [dataset[index] for index in range(len(dataset))]
    assert [item is None for item in items] == [False, False, True, True]
    messages = " ".join(str(warning.message) for warning in caught)
    assert "broken.mp4" in messages and "missing.mp4" in messages
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        read_video(tmp_path / "videos" / "broken.mp4", 5, 32, 32)


def test_synthetic_dataset_moves(tmp_path):
    write_synthetic_dataset(tmp_path, num_videos=4, height=48, width=64, seed=1)
    samples = load_video_captions(tmp_path)
    assert len(samples) == 4
    for sample in samples:
        assert sample.caption.startswith("a ") and sample.video.is_file()
        video = read_video(sample.video, 9, 48, 64)
        assert video.shape == (9, 3, 48, 64)
        assert (video[-1] - video[0]).abs().amax() > 0.5, f"{sample.caption}: the object does not move"
