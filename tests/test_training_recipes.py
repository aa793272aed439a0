"""The training defaults that follow the reference trainers (docs/method.md): LoRA size and rate, the LoRA target
module sets, and the expert a LoRA file records and loads into."""

from __future__ import annotations

import pytest
import torch

from tsa.cli.options import parse_config
from tsa.models import get_family

REAL = ["--model-path", "cogvideox", "--data", "videos", "--teacher-path", "videomae"]


@pytest.fixture
def real_paths(tmp_path, monkeypatch):
    """The paths REAL names exist (tsa-train checks that first), empty: parsing reads no model."""
    monkeypatch.chdir(tmp_path)
    for name in ("cogvideox", "videos", "videomae"):
        (tmp_path / name).mkdir()


def test_lora_without_a_preset_gets_lr_1e4_rank_32_alpha_32(real_paths):
    lora = parse_config([*REAL, "--finetune", "lora"])
    assert (lora.learning_rate, lora.lora_rank, lora.lora_alpha) == (1e-4, 32, 32.0)
    full = parse_config(REAL)
    assert full.learning_rate == 2e-6
    given = parse_config([*REAL, "--finetune", "lora", "--learning-rate", "5e-5", "--lora-rank", "8"])
    assert (given.learning_rate, given.lora_rank, given.lora_alpha) == (5e-5, 8, 32.0)
    preset = parse_config(["--preset", "cogvideox-5b-lora", *REAL])
    assert (preset.learning_rate, preset.lora_rank, preset.lora_alpha) == (1e-4, 128, 64)


@pytest.mark.parametrize(
    "family, ffn", [("wan", ["ffn.net.0.proj", "ffn.net.2"]), ("cogvideox", ["ff.net.0.proj", "ff.net.2"])]
)
def test_lora_target_module_sets_name_the_familys_modules(family, ffn):
    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    assert parse_config(["--model-family", family, "--lora-target-modules", "attn"]).lora_target_modules == attn
    both = parse_config(["--model-family", family, "--lora-target-modules", "attn+ffn"]).lora_target_modules
    assert both == attn + ffn
    assert parse_config(["--model-family", family, "--lora-target-modules", "to_q, to_v"]).lora_target_modules == [
        "to_q", "to_v"]
    # the names are the family transformer's own: every block's feed-forward gets an adapter
    from peft import LoraConfig

    transformer = get_family(family).tiny_components(num_layers=2)["transformer"]
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=both))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_modules() if name.endswith(".lora_A")}
    blocks = get_family(family).blocks(transformer)
    for index in range(len(blocks)):
        prefix = "blocks" if family == "wan" else "transformer_blocks"
        for name in ffn:
            assert f"{prefix}.{index}.{name}" in adapted


def test_an_empty_target_module_list_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--lora-target-modules", " , "])
    assert exit_info.value.code == 2
    assert "--lora-target-modules" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_expert_lora(tmp_path_factory):
    """A tiny Wan2.2 A14B-style folder and a LoRA file for its low-noise expert, written as tsa-train writes it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tsa.models.wan import WanFamily

    root = tmp_path_factory.mktemp("lora-expert")
    family = WanFamily()
    model = family.save_tiny_pipeline(root / "a14b", num_layers=1, two_experts=True)
    transformer = family.load_transformer(model, "transformer_2")
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(family.default_lora_target_modules)))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    run = root / "run"
    family.save_lora_weights(run, get_peft_model_state_dict(transformer), transformer.peft_config["default"].to_dict(),
                             expert="transformer_2")
    return model, run


def test_the_lora_file_records_its_expert_and_loads_into_it(two_expert_lora):
    from tsa.models.base import LORA_WEIGHTS, read_lora_expert
    from tsa.models.wan import WanFamily

    model, run = two_expert_lora
    assert read_lora_expert(run / LORA_WEIGHTS) == "transformer_2"
    family = WanFamily()
    pipe = family.load_run_weights(family.load_pipeline(model), run)  # no expert given: the file's
    assert getattr(pipe.transformer_2, "peft_config", None) and not getattr(pipe.transformer, "peft_config", None)
    alone = family.load_trained_transformer(run, model, "transformer_2")
    assert getattr(alone, "peft_config", None)


def test_a_lora_file_for_another_expert_is_refused_in_one_line(two_expert_lora, tmp_path):
    from tsa.models.wan import WanFamily

    model, run = two_expert_lora
    family = WanFamily()
    for load in (lambda: family.load_run_weights(family.load_pipeline(model), run, "transformer"),
                 lambda: family.load_trained_transformer(run, model, "transformer")):
        with pytest.raises(ValueError, match="adapts transformer_2, not transformer") as error:
            load()
        assert "\n" not in str(error.value)
    one_expert = family.save_tiny_pipeline(tmp_path / "wan21", num_layers=1)
    with pytest.raises(ValueError, match="adapts transformer_2, and this WanPipeline has none"):
        family.load_run_weights(family.load_pipeline(one_expert), run)


def test_tsa_sample_refuses_a_run_whose_lora_file_names_another_expert(two_expert_lora, tmp_path, capsys):
    import json
    import shutil

    from tsa.cli.sample import main

    model, lora_run = two_expert_lora
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "training_args.json").write_text(json.dumps({"model_path": str(model), "expert": "transformer",
                                                        "height": 32, "width": 32, "num_frames": 5}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--prompt", "a cube", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "adapts transformer_2, not transformer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- --latents mean|sample
def test_latents_default_per_family_and_recorded():
    assert parse_config(["--model-family", "wan"]).latents == "mean"
    assert parse_config(["--model-family", "cogvideox"]).latents == "sample"
    config = parse_config(["--model-family", "wan", "--latents", "sample"])
    assert config.latents == "sample" and config.to_dict()["latents"] == "sample"


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_mean_latents_are_the_normalised_posterior_mean_and_deterministic(family):
    from tsa.training.loop import sample_latents

    vae = get_family(family).tiny_components(num_layers=1)["vae"]
    config = dict(vae.config)
    generator = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 2, 2, generator=generator), torch.randn(2, 4, 3, 2, 2, generator=generator)
    batch = {"latent_dist": torch.cat([mean, logvar], dim=1)}
    # the normalisation written out from each pipeline's formula, in float64
    if family == "wan":
        shape = (1, -1, 1, 1, 1)
        latents_mean = torch.tensor(config["latents_mean"], dtype=torch.float64).view(shape)
        latents_std = torch.tensor(config["latents_std"], dtype=torch.float64).view(shape)
        expected = (mean.double() - latents_mean) / latents_std
    else:
        expected = mean.double() * config["scaling_factor"]
    expected = expected.permute(0, 2, 1, 3, 4)
    first = sample_latents(batch, get_family(family), config, torch.float32, "mean")
    torch.manual_seed(1)
    second = sample_latents(batch, get_family(family), config, torch.float32, "mean")
    assert torch.equal(first, second)
    torch.testing.assert_close(first.double(), expected, rtol=1e-6, atol=1e-6)
    drawn = sample_latents(batch, get_family(family), config, torch.float32, "sample")
    assert not torch.allclose(drawn, first)


# ----------------------------------------------------------------------------------- --frame-sampling fps
@pytest.mark.parametrize(
    "source_fps, expected",  # nearest source frame to i / 16 s, written out by hand
    [
        (24, [0, 2, 3, 5, 6, 8, 9, 11, 12]),
        (30, [0, 2, 4, 6, 8, 9, 11, 13, 15]),
        (60, [0, 4, 8, 11, 15, 19, 23, 26, 30]),
    ],
)
def test_fps_sampling_picks_the_nearest_frames_at_the_target_rate(source_fps, expected):
    from tsa.training.data import clip_frame_indices

    assert clip_frame_indices(100, source_fps, 9, 16) == expected
    assert clip_frame_indices(100, source_fps, 9, 16, start=5) == [index + 5 for index in expected]


def grey_clip(path, count, fps):
    """A clip whose frame k is uniformly grey at level 8 k (so a decoded frame tells its index)."""
    import numpy as np

    from tsa.training.data import write_video

    write_video(path, [np.full((32, 32, 3), 8 * k, dtype=np.uint8) for k in range(count)], fps=fps)
    return path


def decoded_indices(video):
    return [round(((float(frame.mean()) + 1) * 127.5) / 8) for frame in video]


@pytest.mark.parametrize(
    "source_fps, expected", [(24, [0, 2, 3, 5, 6]), (30, [0, 2, 4, 6, 8]), (60, [0, 4, 8, 11, 15])]
)
def test_read_video_at_a_target_fps_decodes_those_frames(source_fps, expected, tmp_path):
    from tsa.training.data import read_video

    clip = grey_clip(tmp_path / "clip.mp4", 24, source_fps)
    assert decoded_indices(read_video(clip, 5, 32, 32, fps=16)) == expected
    starts = set()
    for seed in range(6):
        picked = decoded_indices(read_video(clip, 5, 32, 32, fps=16, clip_start="random", seed=seed))
        start = picked[0]
        assert picked == [index + start for index in expected] and 0 <= start <= 24 - (expected[-1] + 1)
        starts.add(start)
    assert len(starts) > 1


def test_a_clip_too_short_for_the_request_is_refused_by_name(tmp_path):
    from tsa.training.data import ClipTooShortError, VideoCaption, VideoCaptionDataset, read_video

    clip = grey_clip(tmp_path / "short.mp4", 10, 24)  # 9 frames at 16 fps need 13 frames at 24 fps
    with pytest.raises(ClipTooShortError, match="short.mp4 is too short: 9 frames at 16 fps need 13"):
        read_video(clip, 9, 32, 32, fps=16)
    dataset = VideoCaptionDataset([VideoCaption(clip, "grey")], 32, 32, 9, fps=16)
    with pytest.raises(ClipTooShortError, match="short.mp4"):
        dataset.pixels(0)  # not skipped or padded: the cache refuses it
    assert len(read_video(clip, 9, 32, 32)) == 9  # spread pads by repeating the last frame


def test_frame_sampling_defaults_follow_the_model():
    assert parse_config(["--model-family", "wan"]).fps == 16
    assert parse_config(["--model-family", "cogvideox"]).fps == 8
    assert parse_config([]).frame_sampling == "spread"  # the tiny preset's clips are short on purpose
    config = parse_config(["--model-family", "wan", "--frame-sampling", "fps", "--fps", "24", "--clip-start", "random"])
    assert (config.frame_sampling, config.fps, config.clip_start) == ("fps", 24.0, "random")


def test_clip_windows_cache_random_windows_and_each_epoch_trains_on_its_own(tmp_path):
    """--clip-windows 3: three random windows of each clip are cached (window 0 under the one-window name), and
    epoch e reads window e % 3 for every clip, its latents and the teacher's pixels from the same frames."""
    from tsa.training.cache import CachedLatentDataset, CacheLayout, LatentEncoder, fill_cache
    from tsa.training.data import VideoCaption, VideoCaptionDataset

    clips = [VideoCaption(grey_clip(tmp_path / f"clip{k}.mp4", 30, 24), f"grey {k}") for k in range(2)]
    videos = VideoCaptionDataset(clips, 32, 32, 5, fps=16, clip_start="random", seed=3)
    layout = CacheLayout(tmp_path / "cache", 32, 32, 5, "model", 8, frames="fps16-random3")

    class FrameEncoder(LatentEncoder):  # an "entry" that says which frames it was encoded from
        def __init__(self):
            pass

        def __call__(self, pixels, caption):
            return {"frames": torch.tensor(decoded_indices(pixels))}

    encoder = FrameEncoder()
    assert fill_cache(videos, layout, encoder, progress=False, windows=3) == (6, 0)
    assert fill_cache(videos, layout, encoder, progress=False, windows=3) == (0, 6)
    assert layout.path(clips[0], 0) == layout.path(clips[0])
    names = [path.name for path in layout.directory.iterdir()]
    assert len(names) == 6 and sum("-w1." in name for name in names) == sum("-w2." in name for name in names) == 2
    dataset = CachedLatentDataset(videos, layout, with_pixels=True, windows=3)
    seen = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        item = dataset[1]
        assert item["frames"].tolist() == decoded_indices(item["pixels"])  # latents and pixels agree
        seen.append(item["frames"].tolist())
    assert seen[3] == seen[0] and len({tuple(frames) for frames in seen[:3]}) == 3


@pytest.mark.slow
def test_a_run_with_clip_windows_trains_epoch_e_on_window_e_mod_k(tiny_runs, tmp_path, monkeypatch):
    """A tiny run of 7 steps (3 epochs) with --clip-windows 2 caches both windows of every clip and trains epochs
    0, 1, 2 on windows 0, 1, 0."""
    from tests.tsa_helpers import QUIET, assets, train_cli
    from tsa.models import DEFAULT_FAMILY
    from tsa.training.cache import CachedLatentDataset

    windows, set_epoch = [], CachedLatentDataset.set_epoch

    def recording_set_epoch(self, epoch):
        set_epoch(self, epoch)
        windows.append((self.windows, epoch, self.window))

    monkeypatch.setattr(CachedLatentDataset, "set_epoch", recording_set_epoch)
    run = tiny_runs(DEFAULT_FAMILY)[0]  # 6 clips, 2 per batch: 3 steps per epoch (trained now if first used)
    # 9 frames at 16 fps span 5 frames of the 8 fps clips (6 to 24 frames long)
    history = train_cli([*assets(run, DEFAULT_FAMILY, cache=False), "--frame-sampling", "fps", "--fps", "16",
                         "--clip-start", "random", "--clip-windows", "2", "--max-steps", "7",
                         "--checkpointing-steps", "7", "--output-dir", tmp_path / "run", *QUIET])
    assert [row["step"] for row in history] == list(range(1, 8))
    assert sorted({call[1:] for call in windows if call[0] == 2}) == [(0, 0), (1, 1), (2, 0)]
    (cache,) = (tmp_path / "run" / "cache").iterdir()
    assert "fps16-random0" in cache.name and len(list(cache.glob("*-w1.safetensors"))) == 6
    assert len(list(cache.glob("*.safetensors"))) == 12


def test_clip_windows_need_random_starts(capsys):
    base = ["--model-family", "wan", "--frame-sampling", "fps", "--clip-start", "random"]
    assert parse_config([*base, "--clip-windows", "4"]).clip_windows == 4
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--model-family", "wan", "--clip-windows", "4"])
    assert exit_info.value.code == 2 and "--clip-windows 4 draws random windows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config([*base, "--clip-windows", "0"])


def test_ti2v_5b_trains_at_its_24_fps(tmp_path, real_paths):
    model = get_family("wan").save_tiny_pipeline(tmp_path / "ti2v", num_layers=1, ti2v=True)
    config = parse_config(["--model-path", str(model), "--data", "videos", "--align", "none", "--height", "64",
                           "--width", "64"])
    assert (config.frame_sampling, config.fps, config.latents) == ("fps", 24.0, "mean")
