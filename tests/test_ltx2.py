"""LTX-2 (tsa.models.ltx2) on tiny random models of the real diffusers / transformers classes: the video-only
objective, the latent normalisation, the prompt conditioning as LTX2Pipeline builds it, the training sigmas, LoRA
in the pipeline's loader format."""

import math

import pytest
import torch

from tsa.models import detect_family, get_family
from tsa.models.ltx2 import LTX2Family, pack_latents, stretched_logit_normal, vae_latent_statistics
from tsa.models.tiny import TINY_TEXT_DIM

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = get_family("ltx2").save_tiny_pipeline(tmp_path_factory.mktemp("ltx2") / "ltx2", num_layers=3)
    family = detect_family(path)
    return {"path": path, "family": family, "pipe": diffusers.LTX2Pipeline.from_pretrained(path)}


def _latents(batch=2, frames=3, height=4, width=6, channels=4, seed=0):
    """Latents (B, F, C, h, w) with h != w, and connector-width prompts of 32 tokens."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, channels, height, width, generator=generator, dtype=torch.float64).float()
    prompt = torch.randn(batch, 32, TINY_TEXT_DIM, generator=generator)
    return latents, prompt


def _tokens(latents):
    """(B, F, C, h, w) -> (B, F*h*w, C), tokens frame-major then row-major (patch size 1), written out."""
    batch, frames, channels, height, width = latents.shape
    return latents.permute(0, 1, 3, 4, 2).reshape(batch, frames * height * width, channels)


def test_folder_configures_the_family(tiny):
    family = tiny["family"]
    vae = tiny["pipe"].vae
    assert isinstance(family, LTX2Family)
    assert (family.temporal_compression, family.spatial_multiple) == (4, 32)  # the pipeline needs 32
    assert family.latents_mean == pytest.approx(vae.latents_mean.tolist())
    assert family.latents_std == pytest.approx(vae.latents_std.tolist())
    assert vae_latent_statistics(tiny["path"] / "vae")[1] == pytest.approx(vae.latents_std.tolist())
    released = dict(  # LTX-2's video VAE (diffusers scripts/convert_ltx2_to_diffusers.py, version 2.0)
        patch_size=4, patch_size_t=1, spatio_temporal_scaling=(True, True, True, True),
        spatial_compression_ratio=32, temporal_compression_ratio=8,
    )
    assert LTX2Family().vae_compression(released) == (8, 32)
    assert LTX2Family().vae_compression({k: v for k, v in released.items() if "ratio" not in k}) == (16, 64)
    assert LTX2Family().check_frames(49) is None and "8k+1" in LTX2Family().check_frames(48)


def test_latents_are_the_normalised_posterior_mean(tiny):
    family, vae = tiny["family"], tiny["pipe"].vae
    generator = torch.Generator().manual_seed(1)
    latent_dist = torch.randn(2, 8, 3, 4, 6, generator=generator)
    assert family.default_latents == "mean"
    out = family.latents_from_distribution(latent_dist, dict(vae.config), sample=False)
    mean = latent_dist[:, :4].double()
    expected = (mean - vae.latents_mean.double().view(1, -1, 1, 1, 1)) / vae.latents_std.double().view(1, -1, 1, 1, 1)
    torch.testing.assert_close(out.double(), expected.permute(0, 2, 1, 3, 4), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="from_model_path"):
        LTX2Family().normalize_latents(mean, {})


def test_prompt_embeddings_are_what_the_pipeline_gives_the_transformer(tiny):
    family, pipe = tiny["family"], tiny["pipe"]
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("call", kwargs)

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe("a red ball rolls", num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
             audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
             audio_modality_scale=1.0, output_type="latent")
    finally:
        hook.remove()
    entry = family.encode_prompts(pipe, ["a red ball rolls"])
    torch.testing.assert_close(entry["prompt_embeds"], seen["call"]["encoder_hidden_states"])
    torch.testing.assert_close(entry["prompt_attention_mask"].float(), seen["call"]["encoder_attention_mask"].float())
    tokens = pipe.tokenizer(["a red ball rolls"], padding="max_length", max_length=1024).attention_mask
    real = int(torch.tensor(tokens).sum())
    # with learnable registers the connector moves the real tokens to the front
    assert entry["prompt_mask"][0, :real].all() and not entry["prompt_mask"][0, real:].any()
    assert entry["prompt_attention_mask"].all()


def test_objective_is_rectified_flow_on_packed_tokens(tiny):
    family, transformer = tiny["family"], tiny["pipe"].transformer
    scheduler = family.load_scheduler(tiny["path"])
    latents, prompt = _latents()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([250.0, 900.0])
    out = family.denoise_and_loss(transformer, scheduler, latents, prompt, timesteps=timesteps, noise=noise)

    sigma = (timesteps / 1000).double().view(2, 1, 1)
    clean, eps = _tokens(latents).double(), _tokens(noise).double()
    noisy = (1 - sigma) * clean + sigma * eps
    torch.testing.assert_close(_tokens(out["noisy_latents"]).double(), noisy, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the transformer as LTX2Pipeline calls it, with an audio stream the video must ignore
        velocity = transformer(
            hidden_states=noisy.float(), audio_hidden_states=torch.randn(2, 5, 4),
            encoder_hidden_states=prompt, audio_encoder_hidden_states=torch.randn(2, 32, TINY_TEXT_DIM),
            timestep=timesteps, audio_timestep=timesteps, sigma=timesteps,
            encoder_attention_mask=torch.ones(2, 32), audio_encoder_attention_mask=torch.ones(2, 32),
            num_frames=3, height=4, width=6, fps=24.0, audio_num_frames=5, isolate_modalities=True,
            return_dict=False,
        )[0].double()
    expected_loss = (velocity - (eps - clean)).pow(2).mean(dim=(1, 2)).mean()
    torch.testing.assert_close(out["loss"].double(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_tokens(out["x0_pred"]).double(), noisy - sigma * velocity, rtol=1e-5, atol=1e-5)


def test_first_frame_conditioning_keeps_frame_zero_clean_and_out_of_the_loss(tiny):
    base, transformer = tiny["family"], tiny["pipe"].transformer
    family = LTX2Family(first_frame_conditioning_p=1.0, latents_mean=base.latents_mean, latents_std=base.latents_std)
    scheduler = family.load_scheduler(tiny["path"])
    latents, prompt = _latents(seed=3)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    timesteps = torch.tensor([600.0, 600.0])
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("t", kwargs["timestep"])

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = family.denoise_and_loss(transformer, scheduler, latents, prompt, timesteps=timesteps, noise=noise)
    finally:
        hook.remove()
    first = 4 * 6  # tokens of latent frame 0
    assert seen["t"].shape == (2, 3 * first)
    assert (seen["t"][:, :first] == 0).all() and (seen["t"][:, first:] == 600).all()
    torch.testing.assert_close(out["noisy_latents"][:, 0], latents[:, 0])
    torch.testing.assert_close(out["x0_pred"][:, 0], latents[:, 0])
    # the loss is the mean over the generated tokens only: moving frame 0's noise does not change it
    other = noise.clone()
    other[:, 0] += 5.0
    again = family.denoise_and_loss(transformer, scheduler, latents, prompt, timesteps=timesteps, noise=other)
    torch.testing.assert_close(again["loss"], out["loss"])


def test_training_sigmas_follow_ltx_trainers_shifted_logit_normal(tiny):
    scheduler = tiny["family"].load_scheduler(tiny["path"])
    tokens = 7 * 17 * 30  # 960 x 544 x 49
    mu = 0.95 + (2.05 - 0.95) / (4096 - 1024) * (tokens - 1024)
    assert LTX2Family().sigma_shift_mu(scheduler, tokens) == pytest.approx(mu)
    family = LTX2Family(uniform_prob=0.0)
    sigmas = family.sample_sigmas(scheduler, 40000, tokens, "cpu", torch.Generator().manual_seed(0))
    # CDF of sigma = (sigmoid(mu + n) - lo) / (hi - lo), n ~ N(0, 1), away from the reflection at eps
    lo, hi = (1 / (1 + math.exp(-(mu + p))) for p in (-2.5758, 3.0902))
    lo0, hi0 = (1 / (1 + math.exp(-p)) for p in (-2.5758, 3.0902))
    for s in (0.1, 0.3, 0.5, 0.7, 0.9):
        value = lo + s * (hi - lo)
        cdf = 0.5 * (1 + math.erf((math.log(value / (1 - value)) - mu) / math.sqrt(2)))
        assert float((sigmas <= s).double().mean()) == pytest.approx(cdf, abs=0.01)
    assert 0 <= float(sigmas.min()) and float(sigmas.max()) <= 1
    generator = torch.Generator().manual_seed(1)
    mixed = LTX2Family(uniform_prob=1.0).sample_sigmas(scheduler, 40000, tokens, "cpu", generator)
    assert float((mixed <= 0.25).double().mean()) == pytest.approx(0.25, abs=0.01)
    ranged = LTX2Family(timestep_range=(200, 400)).sample_timesteps(scheduler, 500, "cpu", num_tokens=tokens)
    assert 200 <= float(ranged.min()) and float(ranged.max()) < 400
    with pytest.raises(ValueError, match="num_tokens"):
        LTX2Family().sample_timesteps(scheduler, 2, "cpu")
    assert LTX2Family(shift=3.0).sigma_shift_mu(scheduler, tokens) == pytest.approx(math.log(3.0))
    below = (1 / (1 + math.exp(3.0)) - lo0) / (hi0 - lo0)  # n = -3 lies below the 0.5th percentile
    assert float(stretched_logit_normal(torch.tensor([-3.0]), 0.0, 1.0)) == pytest.approx(2e-3 - below)


def test_lora_targets_the_video_stream_only(tiny):
    from peft import LoraConfig

    family = tiny["family"]
    transformer = family.load_transformer(tiny["path"])
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(family.default_lora_target_modules)))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A" in name}
    blocks = len(family.blocks(transformer))
    expected = {f"transformer_blocks.{block}.{attention}.{projection}" for block in range(blocks)
                for attention in ("attn1", "attn2") for projection in ("to_q", "to_k", "to_v", "to_out.0")}
    assert adapted == expected


def test_cache_entry_and_the_mask_the_embeddings_carry(tiny):
    """The entry holds the connectors' video output; the pipeline multiplies it by the connectors' mask, so the mask
    the objective derives from the embeddings (their non-zero rows) is the connectors' own, with learnable registers
    or without."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    family, pipe = tiny["family"], tiny["pipe"]
    pixels = torch.rand(9, 3, 64, 96, generator=torch.Generator().manual_seed(7)) * 2 - 1
    entry = family.encode_entry(pipe, pixels, "a cube slides", max_sequence_length=64)
    assert set(entry) == {"latent_dist", "prompt_embeds", "prompt_mask"}
    assert entry["latent_dist"].shape == (8, 3, 4, 6) and entry["prompt_embeds"].shape == (64, TINY_TEXT_DIM)
    captions = ["a cube slides", "a red ball falls and rolls"]
    config = {key: value for key, value in pipe.connectors.config.items() if not key.startswith("_")}
    config.update(video_connector_num_learnable_registers=None, audio_connector_num_learnable_registers=None)
    torch.manual_seed(0)
    original = pipe.connectors
    for connectors in (original, LTX2TextConnectors(**config).eval()):
        pipe.connectors = connectors
        try:
            out = family.encode_prompts(pipe, captions, max_sequence_length=64)
        finally:
            pipe.connectors = original
        torch.testing.assert_close(out["prompt_embeds"].ne(0).any(dim=-1), out["prompt_attention_mask"])
        real = torch.tensor(pipe.tokenizer(captions, padding="max_length", max_length=64).attention_mask).sum(1)
        assert out["prompt_mask"].sum(1).tolist() == real.tolist()


def test_motion_guidance_guides_the_video_step_only(tiny):
    """LTX2Pipeline deep-copies its scheduler for the audio stream: those steps pass through, so scale 0 gives the
    unguided sample bit for bit, and each guided video step is guided once."""
    from tsa.lamo import MotionPredictor, enable_motion_guidance

    family = tiny["family"]
    pipe = family.load_pipeline(tiny["path"])
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    torch.manual_seed(0)
    predictor = MotionPredictor(in_channels=family.latent_channels(config), text_dim=family.text_dim(config),
                                channels=8, num_blocks=1)
    with torch.no_grad():
        predictor.head.weight.normal_(0, 0.5)  # zero-initialised: give the prediction an effect

    def sample():
        return pipe("a ball rolls", num_frames=9, height=64, width=96, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    unguided = sample()
    with enable_motion_guidance(pipe, predictor, scale=0.0, rho=0.5):
        torch.testing.assert_close(sample(), unguided, rtol=0, atol=0)
    with enable_motion_guidance(pipe, predictor, scale=15.0, rho=0.5) as guidance:
        guided = sample()
    assert [index for index, _ in guidance.history] == [2, 3]
    assert guidance.prompt_embeds.shape[-1] == TINY_TEXT_DIM
    assert (guided - unguided).abs().max() > 1e-6
    assert "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
def test_video_tokens_ignore_the_audio_placeholder_for_either_rotary_layout(tiny, rope_type):
    """The released LTX-2.0 checkpoints use "split" rotary tables, which an empty audio stream cannot reshape; the
    one-token placeholder runs with both layouts and its value never reaches the video tokens."""
    family = tiny["family"]
    base = family.unwrap(tiny["pipe"].transformer)
    transformer = type(base).from_config(base.config, rope_type=rope_type)
    transformer.load_state_dict(base.state_dict())
    latents, prompt = _latents(batch=1)
    tokens, grid = _tokens(latents), tuple(latents.shape[i] for i in (1, 3, 4))
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        video = family.transformer_call(transformer, tokens, grid, prompt, timestep)
        audio_text = prompt.new_zeros(1, prompt.shape[1], family.audio_text_dim(transformer.config))
        mask = torch.ones(1, prompt.shape[1])
        other_audio = transformer(
            hidden_states=tokens, audio_hidden_states=torch.full((1, 1, transformer.config.audio_in_channels), 3.0),
            encoder_hidden_states=prompt, audio_encoder_hidden_states=audio_text, timestep=timestep,
            audio_timestep=timestep, sigma=timestep, encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
            num_frames=grid[0], height=grid[1], width=grid[2], fps=family.fps, audio_num_frames=1,
            isolate_modalities=True, return_dict=False,
        )[0]
    assert video.shape == tokens.shape[:2] + (transformer.config.out_channels,) and torch.isfinite(video).all()
    torch.testing.assert_close(video, other_audio, rtol=0, atol=0)


def test_bad_options_are_refused():
    for options, message in (
        (dict(timestep_sampling="cosine"), "timestep_sampling"),
        (dict(logit_std=0), "logit_std"),
        (dict(uniform_prob=1.5), "uniform_prob"),
        (dict(first_frame_conditioning_p=-0.1), "first_frame_conditioning_p"),
        (dict(fps=0), "fps"),
        (dict(shift=-1.0), "shift"),
    ):
        with pytest.raises(ValueError, match=message):
            LTX2Family(**options)
    assert pack_latents(torch.zeros(1, 2, 4, 3, 5)).shape == (1, 30, 4)


@pytest.mark.slow
@pytest.mark.parametrize(("align", "finetune"), [("tsa", "lora"), ("trd", "full"), ("repa", "lora"), ("lamo", "full")])
def test_tsa_train_per_alignment_method_then_tsa_sample(tiny_runs, tmp_path, align, finetune):
    """tsa-train --preset tiny --model-family ltx2 with each method (M-TSA is the shared tiny run's), LoRA and full;
    tsa-sample renders from the run, with motion guidance where the run trained a motion predictor."""
    from tsa_helpers import QUIET, assets, reset_accelerate, train_cli

    from tsa.cli.sample import main as sample_main
    from tsa.training.data import read_video

    run = tiny_runs("ltx2")[0]
    output = tmp_path / align
    history = train_cli(["--output-dir", output, *assets(run, "ltx2"), "--align", align, "--finetune", finetune,
                         "--lora-rank", "4", "--lora-alpha", "4", "--max-steps", "2", "--checkpointing-steps", "2",
                         "--lr-warmup-steps", "0", *QUIET])
    assert [row["step"] for row in history] == [1, 2]
    for row in history:
        assert all(math.isfinite(row[name]) for name in ("loss", "diffusion", "align", "drift", "predictor"))
        assert (row["align"] != 0) == (align != "lamo") and (row["drift"] > 0) == (align == "lamo")
    weights = output / ("pytorch_lora_weights.safetensors" if finetune == "lora" else "transformer")
    assert weights.exists()
    guidance = ["--motion-guidance", "15"] if align == "lamo" else []
    try:
        sample_main([str(output), "--prompt", "a red ball falls", "--num-inference-steps", "2", *guidance,
                     "--output-dir", str(output / "samples")])
    finally:
        reset_accelerate()
    (video,) = (output / "samples").glob("*.mp4")
    assert read_video(video, 9, 96, 128).shape == (9, 3, 96, 128)
