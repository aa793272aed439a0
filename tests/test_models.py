"""Model families: detection, the seam's errors, and Wan (rectified flow) on tiny random models of the real classes."""

import json
import math
import re

import pytest
import torch

from tsa.features import BlockFeatureCapture
from tsa.models import (
    all_objective_options,
    detect_family,
    detect_family_name,
    family_for_pipeline,
    family_of,
    get_family,
)
from tsa.models.base import noise_level_alphas_cumprod
from tsa.models.cogvideox import cogvideox_scheduler
from tsa.objective import AlignmentObjective
from tsa.teachers import load_teacher
from tsa.tiny import TINY_TEXT_DIM, save_tiny_pipeline, tiny_videomae

diffusers = pytest.importorskip("diffusers")
WAN = get_family("wan")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "wan": save_tiny_pipeline(root / "wan", num_layers=3, family="wan"),
        "a14b": save_tiny_pipeline(root / "a14b", family="wan", two_experts=True),
        "ti2v": save_tiny_pipeline(root / "ti2v", family="wan", ti2v=True),
        "cogvideox": save_tiny_pipeline(root / "cogvideox"),
        "videomae": tiny_videomae(root / "videomae"),
    }


def _batch(batch=2, frames=3, height=12, width=10, channels=4, seed=0):
    """Latents (B, F, C, h, w) with h != w (a transposed grid would show), 512 umT5 tokens, 4F-3 pixel frames."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, channels, height, width, generator=generator)
    prompt = torch.randn(batch, 512, TINY_TEXT_DIM, generator=generator)
    pixels = torch.rand(batch, 4 * frames - 3, 3, 8 * height, 8 * width, generator=generator) * 2 - 1
    return latents, prompt, pixels


# ------------------------------------------------------------------------------------------------ the seam


def test_family_detection_and_unsupported_pipelines(assets, tmp_path):
    assert detect_family_name(assets["wan"]) == "wan" and detect_family_name(assets["cogvideox"]) == "cogvideox"
    assert detect_family(assets["a14b"], "transformer_2").timestep_range == (0.0, 875.0)
    assert detect_family(assets["a14b"]).timestep_range == (875.0, 1000.0)
    assert detect_family(assets["ti2v"]).expand_timesteps and detect_family(assets["ti2v"]).spatial_multiple == 32
    assert detect_family(assets["wan"]).timestep_range is None
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(
        ValueError,
        match="unsupported pipeline 'HunyuanVideoPipeline'; supported model families: "
        "cogvideox \\(CogVideoXPipeline, CogVideoXImageToVideoPipeline\\), wan \\(WanPipeline, "
        "WanImageToVideoPipeline\\)",
    ):
        detect_family(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        detect_family(tmp_path / "missing")
    with pytest.raises(ValueError, match="no second expert"):
        detect_family(assets["wan"], "transformer_2")
    with pytest.raises(ValueError, match="the cogvideox family does not take the options \\['shift'\\]"):
        detect_family(assets["cogvideox"], shift=2.0)
    with pytest.raises(TypeError, match="CogVideoXTransformer3DModel, WanTransformer3DModel"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model family must be one of"):
        get_family("ltx")


def test_objectives_need_the_models_scheduler(assets):
    for name in ("wan", "cogvideox"):
        family = detect_family(assets[name])
        transformer = family.load_transformer(assets[name])
        with pytest.raises(ValueError, match="a noise scheduler is required"):
            AlignmentObjective(transformer, align="none")
    wan = WAN.load_transformer(assets["wan"])
    with pytest.raises(ValueError, match="Wan trains with rectified flow"):
        AlignmentObjective(wan, cogvideox_scheduler(), align="none")
    with pytest.raises(ValueError, match="v-prediction"):
        AlignmentObjective(
            get_family("cogvideox").load_transformer(assets["cogvideox"]),
            WAN.load_scheduler(assets["wan"]),
            align="none",
        )
    with pytest.raises(ValueError, match="a noise scheduler is required"):
        noise_level_alphas_cumprod(None)


def test_flow_noise_levels_for_lamo(assets):
    scheduler = WAN.load_scheduler(assets["wan"])
    alphas = noise_level_alphas_cumprod(scheduler)
    sigma = 3 * (torch.arange(1000) / 1000) / (1 + 2 * (torch.arange(1000) / 1000))
    torch.testing.assert_close(alphas, (1 - sigma.square()).float())
    torch.testing.assert_close(
        noise_level_alphas_cumprod(cogvideox_scheduler()), cogvideox_scheduler().alphas_cumprod.float()
    )


# ------------------------------------------------------------------------------------------------ Wan


def test_wan_block_capture_equals_the_hooked_block_output(assets):
    transformer = WAN.load_transformer(assets["wan"])
    latents, prompt, _ = _batch()
    hooked = []
    handle = transformer.blocks[1].register_forward_hook(lambda module, args, output: hooked.append(output))
    with BlockFeatureCapture(transformer, 2) as capture:
        transformer(
            hidden_states=latents.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=prompt,
            timestep=torch.tensor([10.0, 700.0]),
            return_dict=False,
        )
    handle.remove()
    features = capture.features
    assert features.shape == (2, 3, 6, 5, 32)  # (B, F, h/2, w/2, 2 heads x 16)
    torch.testing.assert_close(features, hooked[0].view(2, 3, 6, 5, 32), rtol=0, atol=0)
    # the tokens are the patch embedding's (f, h, w) order: block 1's input is the embedded latents
    inputs = []
    handle = transformer.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    transformer(
        hidden_states=latents.permute(0, 2, 1, 3, 4),
        encoder_hidden_states=prompt,
        timestep=torch.tensor([10.0, 700.0]),
        return_dict=False,
    )
    handle.remove()
    embedded = transformer.patch_embedding(latents.permute(0, 2, 1, 3, 4))  # (B, C, F, H, W)
    torch.testing.assert_close(WAN.video_tokens(inputs[0], (3, 6, 5)), embedded.permute(0, 2, 3, 4, 1))
    with pytest.raises(ValueError, match=r"block_index must be an int in \[1, 3\]"):
        BlockFeatureCapture(transformer, 4)
    assert WAN.default_align_layer(30) == 18 and WAN.default_align_layer(40) == 24


def test_wan_objective_is_rectified_flow(assets):
    family = detect_family(assets["wan"])
    transformer, scheduler = family.load_transformer(assets["wan"]).eval(), family.load_scheduler(assets["wan"])
    latents, prompt, _ = _batch()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([0.0, 987.5])
    objective = AlignmentObjective(transformer, scheduler, align="none")
    with torch.no_grad():
        out = objective(latents, prompt, timesteps=timesteps, noise=noise)
        sigma = (timesteps / 1000).view(2, 1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        velocity = transformer(
            hidden_states=noisy.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=prompt,
            timestep=timesteps,
            return_dict=False,
        )[0].permute(0, 2, 1, 3, 4)
    per_sample = (velocity - (noise - latents)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["diffusion"], per_sample.mean())
    torch.testing.assert_close(out["x0_pred"], noisy - sigma * velocity)
    torch.testing.assert_close(out["x0_pred"][0], latents[0])  # sigma = 0: x_t is x0
    assert out["timesteps"].tolist() == [0.0, 987.5] and out["x0"] is latents
    assert out["align"].item() == 0 and out["loss"] == out["diffusion"]


def test_wan_timestep_sampling(assets):
    scheduler = WAN.load_scheduler(assets["wan"])
    draw = WAN.sample_timesteps(scheduler, 20000, "cpu", torch.Generator().manual_seed(0))
    again = WAN.sample_timesteps(scheduler, 20000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(draw, again) and draw.dtype == torch.float32
    assert 0 < draw.min() and draw.max() < 1000
    # u ~ logit-normal(0, 1) has median 1/2; shift 3 maps it to sigma = 1.5 / 2 = 0.75
    assert abs(draw.median().item() - 750) < 10
    sigma = draw.double() / 1000
    u = sigma / (3 - 2 * sigma)
    logits = torch.log(u / (1 - u))
    assert abs(logits.mean().item()) < 0.03 and abs(logits.std().item() - 1) < 0.03
    uniform = get_family("wan", timestep_sampling="uniform", shift=1.0)
    flat = uniform.sample_timesteps(scheduler, 20000, "cpu", torch.Generator().manual_seed(0))
    assert abs(flat.mean().item() - 500) < 10 and abs(flat.median().item() - 500) < 15
    low_noise = get_family("wan", timestep_range=(0, 875))
    restricted = low_noise.sample_timesteps(scheduler, 20000, "cpu", torch.Generator().manual_seed(0))
    assert restricted.max() < 875 and restricted.min() > 0

    # the truncated density: P(t < 500 | t < 875) of the shifted logit-normal
    def cdf(t):
        u = (t / 1000) / (3 - 2 * t / 1000)  # the unshifted u of sigma = t / 1000
        return 0.5 * (1 + math.erf(math.log(u / (1 - u)) / math.sqrt(2)))

    assert abs((restricted < 500).double().mean().item() - cdf(500) / cdf(875)) < 0.015
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        get_family("wan", timestep_sampling="cosine")


def test_wan_ti2v_per_token_timesteps(assets):
    """expand_timesteps: the transformer gets (B, tokens) timesteps; equal per-token values give the scalar result."""
    family = detect_family(assets["ti2v"])
    transformer, scheduler = family.load_transformer(assets["ti2v"]).eval(), family.load_scheduler(assets["ti2v"])
    latents, prompt, _ = _batch(channels=6)
    fixed = dict(timesteps=torch.tensor([250.0, 600.0]), noise=torch.randn_like(latents))
    seen = []
    handle = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].shape), with_kwargs=True)
    with torch.no_grad():
        expanded = family.denoise_and_loss(transformer, scheduler, latents, prompt, **fixed)
        scalar = get_family("wan").denoise_and_loss(transformer, scheduler, latents, prompt, **fixed)
    handle.remove()
    assert seen == [(2, 3 * 6 * 5), (2,)]
    torch.testing.assert_close(expanded["x0_pred"], scalar["x0_pred"])
    with pytest.raises(ValueError, match="latents have 4 channels, the transformer takes 6"):
        AlignmentObjective(transformer, scheduler, align="none", family=family)(_batch()[0], prompt)


def test_wan_cached_latents_are_normalised(assets):
    from tsa.training.cache import LatentEncoder

    encoder = LatentEncoder(assets["wan"])
    assert encoder.max_sequence_length == 512
    pixels = torch.rand(9, 3, 48, 64) * 2 - 1
    entry = encoder(pixels, "a red ball falls")
    assert entry["latent_dist"].shape == (8, 3, 6, 8) and entry["prompt_embeds"].shape == (512, TINY_TEXT_DIM)
    config = json.loads((assets["wan"] / "vae" / "config.json").read_text())
    mean = torch.tensor(config["latents_mean"]).view(1, 1, 4, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, 1, 4, 1, 1)
    torch.manual_seed(0)
    latents = WAN.latents_from_distribution(entry["latent_dist"][None], config)
    torch.manual_seed(0)
    raw = entry["latent_dist"][None, :4] + (entry["latent_dist"][None, 4:].clamp(-30, 20) / 2).exp() * torch.randn(
        1, 4, 3, 6, 8
    )
    torch.testing.assert_close(latents, (raw.permute(0, 2, 1, 3, 4) - mean) / std)


def test_wan_guided_step_lowers_the_guidance_loss(assets):
    from tsa.lamo import MotionPredictor, enable_motion_guidance, motion_guidance_loss

    pipe = diffusers.WanPipeline.from_pretrained(assets["wan"])
    assert family_for_pipeline(pipe).name == "wan"
    predictor = MotionPredictor(in_channels=4, channels=8, num_blocks=1, text_dim=TINY_TEXT_DIM)
    torch.manual_seed(0)
    for parameter in predictor.parameters():  # the zero-initialised layers would make the guidance a no-op
        torch.nn.init.normal_(parameter, std=0.2)
    pipe.scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 3, 6, 8, generator=generator)  # the pipeline's (B, C, F, h, w)
    v_hat = torch.randn(x_t.shape, generator=generator)
    t = pipe.scheduler.timesteps[5]
    sigma = pipe.scheduler.sigmas[5]

    def step():
        pipe.scheduler._step_index = 5
        return pipe.scheduler.step(v_hat, t, x_t, return_dict=False)[0]

    unguided = step()
    with enable_motion_guidance(pipe, predictor, scale=15.0) as guidance:
        with torch.no_grad():
            pipe.encode_prompt("a ball falls", do_classifier_free_guidance=False, max_sequence_length=512)
            guided = step()
    assert [index for index, _ in guidance.history] == [5]
    x0 = lambda v: (x_t - sigma * v).permute(0, 2, 1, 3, 4)
    v_guided = v_hat + (guided - unguided) / (pipe.scheduler.sigmas[6] - sigma)  # the Euler step is linear in v
    with torch.no_grad():
        before = motion_guidance_loss(predictor, x0(v_hat), guidance.prompt_embeds, 1, guidance.prompt_mask)
        after = motion_guidance_loss(predictor, x0(v_guided), guidance.prompt_embeds, 1, guidance.prompt_mask)
    assert guidance.history[0][1] == pytest.approx(before.item(), rel=1e-5)
    assert after < before


def test_unipc_flow_scheduler_as_wan_folders_ship_it():
    """Wan2.1's diffusers folders ship UniPCMultistepScheduler(flow_prediction, use_flow_sigmas, flow_shift)."""
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    WAN.check_scheduler(scheduler)
    u = torch.arange(1000) / 1000
    torch.testing.assert_close(noise_level_alphas_cumprod(scheduler), (1 - (5 * u / (1 + 4 * u)).square()).float())
    draw = WAN.sample_timesteps(scheduler, 4000, "cpu", torch.Generator().manual_seed(0))
    assert abs(draw.median().item() - 1000 * 2.5 / 3) < 15  # shift 5 maps u = 1/2 to sigma = 5/6
    scheduler.set_timesteps(10)
    sample, velocity = torch.randn(1, 4, 3, 4, 6), torch.randn(1, 4, 3, 4, 6)
    x0 = WAN.x0_from_output(scheduler, velocity, sample, scheduler.timesteps[3])
    torch.testing.assert_close(x0, (sample - scheduler.sigmas[3] * velocity).permute(0, 2, 1, 3, 4))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-family", "cogvideox", "--model-path", "{wan}"], "does not match .* a wan pipeline"),
        (["--model-path", "{unsupported}"], "unsupported pipeline 'LTXPipeline'"),
        (["--model-path", "{wan}", "--expert", "transformer_2"], "has no second expert"),
        (["--model-family", "cogvideox", "--flow-shift", "2"],
         f"apply to the families that take them \\({re.escape(', '.join(all_objective_options()['flow_shift']))}\\)"),
        (["--model-family", "wan", "--logit-std", "0"], "--logit-std must be a finite number > 0"),
        (["--model-family", "cogvideox", "--expert", "transformer_2"], "cogvideox pipelines have the denoisers"),
        (["--model-path", "{ti2v}", "--height", "48"], "must be multiples of 32 for .* \\(VAE x patch size\\)"),
    ],
)
def test_family_options_on_the_command_line(assets, tmp_path, argv, message, capsys, monkeypatch):
    from tsa.cli.options import parse_config

    monkeypatch.chdir(tmp_path)
    for name in ("d", "t"):  # the paths the options name exist (they are checked first)
        (tmp_path / name).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline"}))
    paths = {"{wan}": str(assets["wan"]), "{ti2v}": str(assets["ti2v"]), "{unsupported}": str(tmp_path)}
    common = ["--preset", "tiny", "--data", "d", "--teacher-path", "t"]
    with pytest.raises(SystemExit):
        parse_config(common + [paths.get(arg, arg) for arg in argv])
    assert re.search(message, capsys.readouterr().err)
    args = parse_config([*common, "--model-path", str(assets["a14b"]), "--expert", "transformer_2"])
    assert (args.model_family, args.expert) == ("wan", "transformer_2")


def test_wan_capture_under_gradient_checkpointing(assets):
    transformer = WAN.load_transformer(assets["wan"]).train()
    latents, prompt, _ = _batch(batch=1)
    grads = []
    for checkpointing in (False, True):
        transformer.zero_grad()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        with BlockFeatureCapture(transformer, 2) as capture:
            transformer(
                hidden_states=latents.permute(0, 2, 1, 3, 4),
                encoder_hidden_states=prompt,
                timestep=torch.tensor([400.0]),
                return_dict=False,
            )
        capture.features.square().mean().backward()
        grads.append(transformer.blocks[0].attn1.to_q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_wan_native_grid_alignment(assets):
    """native grid: the DiT grid (frame 0 dropped) is kept and the teacher's features are resampled up to it."""
    family = detect_family(assets["wan"])
    objective = AlignmentObjective(
        family.load_transformer(assets["wan"]),
        family.load_scheduler(assets["wan"]),
        load_teacher("videomae", assets["videomae"]),
        align="mtsa",
        grid="native",
        block_index=1,
        projector_hidden_dim=8,
        top_k=0.25,
    )
    latents, prompt, pixels = _batch(batch=1)
    out = objective(latents, prompt, pixels)
    assert torch.isfinite(out["loss"]) and out["align"] > 0
    assert objective.projector.output_grid((3, 6, 5)) == (2, 6, 5)
