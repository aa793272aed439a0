"""Image-to-video: the first-frame condition built as each family's image-to-video pipeline builds it, a tiny
I2V run (M-TSA + LoRA) whose LoRA loads into that pipeline, and tsa-sample --image."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tsa_helpers import QUIET, train_cli
from tsa.models import get_family


def test_cogvideox_image_condition_is_the_pipelines(tmp_path):
    """image_latents from the cached first-frame posterior equal CogVideoXImageToVideoPipeline.prepare_latents'."""
    from diffusers import CogVideoXImageToVideoPipeline

    from tsa.models import detect_family

    model = get_family("cogvideox").save_tiny_pipeline(tmp_path / "i2v", num_layers=1, i2v=True)
    family = detect_family(model)
    assert family.image_to_video and family.sampling_defaults(model).variant == "cogvideox-5b-i2v"
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(model)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        entry = family.encode_image_condition(pipe, video)
        _, expected = pipe.prepare_latents(video[:, :, 0], 1, 4, 9, 32, 32, torch.float32, "cpu",
                                           torch.Generator().manual_seed(5))
    latents = torch.zeros(1, 3, 4, 4, 4)
    torch.manual_seed(5)
    condition = family.image_condition({"image_latent_dist": entry["image_latent_dist"][None]}, dict(pipe.vae.config),
                                       latents)
    assert condition["image_latents"].shape == expected.shape == (1, 3, 4, 4, 4)
    torch.testing.assert_close(condition["image_latents"], expected, rtol=1e-5, atol=1e-6)
    assert get_family("cogvideox").image_condition({}, {}, latents) == {}  # text-to-video: no condition


@pytest.mark.parametrize("options, variant", [({"i2v": True}, "wan2.1-i2v-480p"),
                                              ({"i2v": True, "two_experts": True}, "wan2.2-i2v-a14b")])
def test_wan_image_condition_is_the_pipelines(options, variant, tmp_path):
    """condition (mask + normalised first-frame latents) and Wan2.1's CLIP image_embeds equal
    WanImageToVideoPipeline.prepare_latents' and encode_image's for the same first frame."""
    import numpy as np
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from tsa.models import detect_family

    model = get_family("wan").save_tiny_pipeline(tmp_path / "i2v", num_layers=1, **options)
    family = detect_family(model)
    assert family.image_to_video and family.sampling_defaults(model, 32, 32).variant == variant
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)  # decoded frames are uint8
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    first = Image.fromarray(frames[0])
    with torch.no_grad():
        entry = family.encode_image_condition(family.load_encoders(model), video)
        image = pipe.video_processor.preprocess(first, height=32, width=32)
        _, expected = pipe.prepare_latents(image, 1, 4, 32, 32, 9, torch.float32, "cpu", torch.Generator())
    latents = torch.zeros(1, 3, 4, 4, 4)
    condition = family.image_condition({key: value[None] for key, value in entry.items()}, dict(pipe.vae.config),
                                       latents)
    assert condition["condition"].shape == expected.shape == (1, 8, 3, 4, 4)
    torch.testing.assert_close(condition["condition"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(condition["condition"][:, :4, 0], torch.ones(1, 4, 4, 4))  # first latent frame: 4 frames
    assert not condition["condition"][:, :4, 1:].any()
    if pipe.transformer.config.image_dim is None:
        assert "image_embeds" not in condition
    else:
        torch.testing.assert_close(condition["image_embeds"], pipe.encode_image(first, "cpu"), rtol=0, atol=0)


@pytest.fixture(scope="module")
def cogvideox_i2v_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("i2v") / "run"
    train_cli(["--preset", "tiny", "--model-family", "cogvideox", "--task", "i2v", "--align", "mtsa", "--finetune",
               "lora", "--lora-rank", "4", "--lora-alpha", "4", "--max-steps", "2", "--checkpointing-steps", "2",
               "--num-videos", "4", "--viz-steps", "2", "--output-dir", str(output), *QUIET])
    return output


def test_tiny_cogvideox_i2v_run_trains_and_its_lora_loads_into_the_i2v_pipeline(cogvideox_i2v_run):
    from diffusers import CogVideoXImageToVideoPipeline

    run = cogvideox_i2v_run
    args = json.loads((run / "training_args.json").read_text())
    assert args["task"] == "i2v" and args["finetune"] == "lora" and args["align"] == "mtsa"
    assert list((run / "viz").glob("step-*.png"))  # the correspondence maps see the condition too
    assert json.loads((run / "tiny" / "cogvideox-i2v" / "model_index.json").read_text())["_class_name"] == (
        "CogVideoXImageToVideoPipeline")
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(run / "tiny" / "cogvideox-i2v")
    pipe.load_lora_weights(run)  # the diffusers loader alone
    assert getattr(pipe.transformer, "peft_config", None)


def test_tsa_sample_image_renders_and_is_required(cogvideox_i2v_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tsa.cli.sample import main
    from tsa.training.data import read_video

    image = tmp_path / "first.png"
    Image.fromarray(np.full((96, 144, 3), 200, dtype=np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main([str(cogvideox_i2v_run), "--prompt", "a ball", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--image is needed" in capsys.readouterr().err
    main([str(cogvideox_i2v_run), "--prompt", "a ball", "--image", str(image), "--num-inference-steps", "2",
          "--device", "cpu", "--output-dir", str(tmp_path / "samples")])
    (video,) = (tmp_path / "samples").glob("*.mp4")
    assert read_video(video, 9, 96, 144).shape == (9, 3, 96, 144)
    settings = json.loads(video.with_suffix(".json").read_text())
    assert settings["image"] == str(image.resolve()) and settings["variant"] == "cogvideox-5b-i2v"


def test_tiny_wan_i2v_run_trains_its_lora_loads_and_tsa_sample_renders(tmp_path):
    import numpy as np
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from tsa.cli.sample import main

    output = tmp_path / "run"
    train_cli(["--preset", "tiny", "--model-family", "wan", "--task", "i2v", "--align", "mtsa", "--finetune", "lora",
               "--lora-rank", "4", "--lora-alpha", "4", "--max-steps", "2", "--checkpointing-steps", "2",
               "--num-videos", "4", "--output-dir", str(output), *QUIET])
    model = output / "tiny" / "wan-i2v"
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    pipe.load_lora_weights(output)
    assert getattr(pipe.transformer, "peft_config", None)
    image = tmp_path / "first.png"
    Image.fromarray(np.full((96, 144, 3), 90, dtype=np.uint8)).save(image)
    main([str(output), "--prompt", "a ball", "--image", str(image), "--num-inference-steps", "2", "--device", "cpu"])
    (video,) = (output / "samples").glob("*.mp4")
    assert json.loads(video.with_suffix(".json").read_text())["variant"] == "wan2.1-i2v-480p"


def test_ti2v_5b_first_frame_condition_is_the_pipelines_and_trains(tmp_path):
    """TI2V-5B: the first latent frame is the image's (normalised VAE mode of the first frame alone) at timestep 0,
    as WanImageToVideoPipeline with expand_timesteps builds it; the loss leaves that frame out."""
    import numpy as np
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from tsa.models.wan import WanFamily

    model = get_family("wan").save_tiny_pipeline(tmp_path / "ti2v", num_layers=1, ti2v=True)
    family = WanFamily.from_model_path(model)
    assert WanFamily.tasks(model) == ("t2v", "i2v") and not family.image_to_video
    family.image_to_video = True
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    frames = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        entry = family.encode_image_condition(family.load_encoders(model), video)
        image = pipe.video_processor.preprocess(Image.fromarray(frames[0]), height=64, width=64)
        _, expected, first_frame_mask = pipe.prepare_latents(image, 1, 6, 64, 64, 5, torch.float32, "cpu",
                                                             torch.Generator())
    latents = torch.randn(1, 2, 6, 4, 4)
    condition = family.image_condition({key: value[None] for key, value in entry.items()}, dict(pipe.vae.config),
                                       latents)
    torch.testing.assert_close(condition["first_frame_latents"], expected, rtol=1e-5, atol=1e-5)

    seen = {}

    def spy(module, args, kwargs):
        seen.update(hidden_states=kwargs["hidden_states"].clone(), timestep=kwargs["timestep"].clone())

    handle = pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    scheduler = family.load_scheduler(model)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    out = family.denoise_and_loss(pipe.transformer, scheduler, latents, torch.randn(1, 5, 32),
                                  timesteps=torch.tensor([500.0]), noise=noise, **condition)
    handle.remove()
    torch.testing.assert_close(seen["hidden_states"][:, :, :1], expected)
    noisy = 0.5 * latents + 0.5 * noise  # sigma = 500 / 1000
    torch.testing.assert_close(seen["hidden_states"][:, :, 1:], noisy.permute(0, 2, 1, 3, 4)[:, :, 1:])
    tokens_per_frame = 2 * 2  # 4 x 4 latents, patch 2 x 2
    assert torch.equal(seen["timestep"][0, :tokens_per_frame], torch.zeros(tokens_per_frame))
    assert torch.equal(seen["timestep"][0, tokens_per_frame:], torch.full((tokens_per_frame,), 500.0))
    assert torch.isfinite(out["loss"])


def test_tiny_ti2v_i2v_run_trains_and_tsa_sample_image_renders(tmp_path):
    import numpy as np
    from PIL import Image

    from tsa.cli.sample import main

    model = get_family("wan").save_tiny_pipeline(tmp_path / "ti2v", ti2v=True)  # 2 blocks: the tiny preset aligns 2
    output = tmp_path / "run"
    train_cli(["--preset", "tiny", "--model-path", str(model), "--task", "i2v", "--align", "mtsa", "--finetune",
               "lora", "--lora-rank", "4", "--lora-alpha", "4", "--max-steps", "2", "--checkpointing-steps", "2",
               "--num-videos", "4", "--height", "128", "--width", "192", "--output-dir", str(output), *QUIET])
    assert json.loads((output / "training_args.json").read_text())["task"] == "i2v"
    image = tmp_path / "first.png"
    Image.fromarray(np.full((128, 192, 3), 60, dtype=np.uint8)).save(image)
    main([str(output), "--prompt", "a ball", "--image", str(image), "--num-inference-steps", "2", "--device", "cpu"])
    (video,) = (output / "samples").glob("*.mp4")
    settings = json.loads(video.with_suffix(".json").read_text())
    assert settings["variant"] == "wan2.2-ti2v-5b" and settings["fps"] == 24


def test_task_must_match_the_model_folder(tmp_path, capsys, monkeypatch):
    from tsa.cli.options import parse_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "videos").mkdir()  # the paths an option names exist (they are checked first)
    model = get_family("cogvideox").save_tiny_pipeline(tmp_path / "t2v", num_layers=1)
    with pytest.raises(SystemExit):
        parse_config(["--model-path", str(model), "--data", "videos", "--align", "none", "--task", "i2v"])
    assert "--task i2v" in capsys.readouterr().err
    assert parse_config(["--model-path", str(model), "--data", "videos", "--align", "none"]).task == "t2v"


def _guidance_predictor(pipe):
    from tsa.lamo import MotionPredictor

    torch.manual_seed(0)
    predictor = MotionPredictor(in_channels=pipe.transformer.config.out_channels, channels=16, num_blocks=2,
                                cond_dim=16, text_dim=pipe.text_encoder.config.d_model)
    with torch.no_grad():  # a trained predictor predicts motion; a fresh one predicts none
        predictor.head.weight.normal_(std=0.1)
    return predictor


@pytest.mark.parametrize("family,options,pipeline", [
    ("cogvideox", dict(i2v=True), "CogVideoXImageToVideoPipeline"),
    ("wan", dict(i2v=True), "WanImageToVideoPipeline"),
    ("wan", dict(ti2v=True), "WanImageToVideoPipeline"),  # a TI2V-5B folder is a WanPipeline's: both tasks
], ids=["cogvideox-i2v", "wan2.1-i2v", "ti2v-5b"])
def test_motion_guidance_guides_each_image_to_video_pipeline(family, options, pipeline, tmp_path, monkeypatch):
    """LaMo's guidance inside the I2V pipelines: scale 0 leaves the sample as it is, a positive scale guides every
    step and changes the sample; TI2V-5B's x0 keeps the image's first latent frame (its tokens are at timestep 0)
    and the pipeline's output keeps it too."""
    import diffusers
    import numpy as np
    from PIL import Image

    import tsa.lamo.guidance as guidance_module
    from tsa.lamo import enable_motion_guidance

    folder = get_family(family).save_tiny_pipeline(tmp_path / "pipe", **options)
    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    predictor = _guidance_predictor(pipe)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def sample():
        return pipe(prompt="a ball", image=image, height=64, width=64, num_frames=9, num_inference_steps=4,
                    guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent").frames

    unguided = sample()
    with enable_motion_guidance(pipe, predictor, scale=0.0, rho=1.0):
        assert torch.equal(sample(), unguided)
    seen = []
    loss = guidance_module.motion_guidance_loss
    monkeypatch.setattr(guidance_module, "motion_guidance_loss", lambda p, x0, *a: seen.append(x0) or loss(p, x0, *a))
    with enable_motion_guidance(pipe, predictor, scale=15.0, rho=1.0) as guidance:
        guided = sample()
        hidden = guidance.transformer_kwargs["hidden_states"]
    assert [index for index, _ in guidance.history] == [0, 1, 2, 3] and len(seen) == 4
    assert torch.isfinite(guided).all() and not torch.equal(guided, unguided)
    if options.get("ti2v"):  # latents (B, C, F, h, w); x0 (B, F, C, h, w)
        torch.testing.assert_close(seen[-1][:, 0], hidden[:, :, 0].float(), rtol=0, atol=0)
        torch.testing.assert_close(guided[:, :, 0], unguided[:, :, 0])
        assert not torch.equal(guided[:, :, 1:], unguided[:, :, 1:])


def test_tsa_sample_image_with_motion_guidance_records_it(cogvideox_i2v_run, tmp_path):
    import numpy as np
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    from tsa.cli.sample import main

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(cogvideox_i2v_run / "tiny" / "cogvideox-i2v")
    _guidance_predictor(pipe).save_pretrained(tmp_path / "predictor")
    image = tmp_path / "first.png"
    Image.fromarray(np.full((96, 144, 3), 120, dtype=np.uint8)).save(image)
    main([str(cogvideox_i2v_run), "--prompt", "a ball", "--image", str(image), "--num-inference-steps", "2",
          "--motion-guidance", "15", "--predictor", str(tmp_path / "predictor"), "--device", "cpu",
          "--output-dir", str(tmp_path / "samples")])
    (video,) = (tmp_path / "samples").glob("*.mp4")
    settings = json.loads(video.with_suffix(".json").read_text())
    assert settings["image"] == str(image.resolve())
    assert settings["motion_guidance"]["scale"] == 15 and settings["motion_guidance"]["predictor"] == str(
        (tmp_path / "predictor").resolve())
