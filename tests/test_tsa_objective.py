"""The CogVideoX diffusion objective and AlignmentObjective on tiny real models loaded with from_pretrained."""

import pytest
import torch

from tsa.diffusion import denoise_and_loss
from tsa.models.cogvideox import (
    cogvideox_scheduler,
    diffusion_loss,
    rotary_embeddings,
    sample_timesteps,
    tiny_transformer,
)
from tsa.models.tiny import TINY_TEXT_DIM, TINY_TEXT_LENGTH
from tsa.objective import AlignmentObjective
from tsa.projector import AlignmentProjector
from tsa.teachers import load_teacher
from tsa.tiny import tiny_dinov2, tiny_videomae, tiny_vjepa2

diffusers = pytest.importorskip("diffusers")
SCHEDULER = cogvideox_scheduler()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    tiny_transformer(num_layers=2).save_pretrained(root / "transformer")
    return {
        "transformer": root / "transformer",
        "videomae": tiny_videomae(root / "videomae"),
        "dinov2": tiny_dinov2(root / "dinov2"),
        "vjepa2": tiny_vjepa2(root / "vjepa2"),
    }


def _transformer(assets):
    return diffusers.CogVideoXTransformer3DModel.from_pretrained(assets["transformer"])


def _batch(batch=2, frames=3, size=12, seed=0):
    """Latents of 3 frames x 12 x 12 (DiT grid 3 x 6 x 6 -> teacher grid 4 x 2 x 2), 9 pixel frames."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, size, size, generator=generator)
    prompt = torch.randn(batch, TINY_TEXT_LENGTH, TINY_TEXT_DIM, generator=generator)
    pixels = torch.rand(batch, 4 * frames - 3, 3, 8 * size, 8 * size, generator=generator) * 2 - 1
    return latents, prompt, pixels


def test_diffusion_objective_is_v_prediction_mse(assets):
    transformer = _transformer(assets).eval()
    scheduler = cogvideox_scheduler()
    latents, prompt, _ = _batch()
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([0, 999])
    with torch.no_grad():
        out = denoise_and_loss(transformer, scheduler, latents, prompt, timesteps=timesteps, noise=noise)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        velocity = transformer(hidden_states=noisy, encoder_hidden_states=prompt, timestep=timesteps,
                               return_dict=False)[0]
    alphas = scheduler.alphas_cumprod[timesteps].float().view(2, 1, 1, 1, 1)
    torch.testing.assert_close(out["x0_pred"], alphas.sqrt() * noisy - (1 - alphas).sqrt() * velocity)
    target = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    torch.testing.assert_close(out["loss"], (velocity - target).pow(2).mean(), rtol=1e-4, atol=1e-6)
    assert out["timesteps"].tolist() == [0, 999] and alphas[1].item() == 0  # zero terminal SNR
    assert diffusion_loss(scheduler, latents, latents, timesteps).item() == 0


def test_timesteps_are_uniform_and_seeded(assets):
    transformer = _transformer(assets)
    latents, prompt, _ = _batch(batch=1)
    draws = [denoise_and_loss(transformer, cogvideox_scheduler(), latents, prompt,
                              generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0]["timesteps"], draws[1]["timesteps"])
    torch.testing.assert_close(draws[0]["loss"], draws[1]["loss"])
    sample = sample_timesteps(cogvideox_scheduler(), 4000, "cpu", torch.Generator().manual_seed(0))
    assert sample.min() >= 0 and sample.max() <= 999 and abs(sample.float().mean().item() - 499.5) < 15


def test_rotary_embeddings_for_any_grid():
    """5B-style (RoPE) and 1.5-style (RoPE + temporal patch) transformers train at several latent sizes."""
    assert rotary_embeddings(tiny_transformer(), torch.zeros(1, 3, 4, 8, 8)) is None  # 2B: sincos in the model
    for patch_t in (None, 2):
        transformer = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=TINY_TEXT_DIM, num_layers=1, sample_width=8, sample_height=8, sample_frames=9,
            patch_size=2, patch_size_t=patch_t, use_rotary_positional_embeddings=True, patch_bias=patch_t is None,
        )
        for shape in ((1, 4, 4, 8, 8), (2, 2, 4, 4, 6)):
            latents = torch.randn(shape)
            cos, sin = rotary_embeddings(transformer, latents)
            tokens = -(-shape[1] // (patch_t or 1)) * (shape[3] // 2) * (shape[4] // 2)
            assert cos.shape == sin.shape == (tokens, 16)
            out = denoise_and_loss(transformer, cogvideox_scheduler(), latents, torch.randn(shape[0], 5, TINY_TEXT_DIM))
            assert out["x0_pred"].shape == shape and torch.isfinite(out["loss"])


@pytest.mark.parametrize("align", ["none", "tsa", "mtsa", "trd", "repa"])
def test_objective_outputs_and_gradients(assets, align):
    teacher = load_teacher("videomae", assets["videomae"])
    objective = AlignmentObjective(_transformer(assets), SCHEDULER, teacher=teacher, align=align, block_index=1,
                                   projector_hidden_dim=32)
    latents, prompt, pixels = _batch()
    out = objective(latents, prompt, pixels)
    assert set(out) == {"loss", "diffusion", "align", "x0_pred", "x0", "timesteps"}
    assert out["x0_pred"].shape == latents.shape and out["x0"] is latents and out["timesteps"].shape == (2,)
    torch.testing.assert_close(out["loss"], out["diffusion"] + 0.5 * out["align"])
    if align == "none":
        assert out["align"].item() == 0 and objective.projector is None
        return
    assert out["align"].item() != 0
    out["align"].backward()
    assert objective.transformer.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in objective.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    names = [name for name, _ in objective.named_parameters()] + list(objective.state_dict())
    assert not any("teacher" in name or "model.encoder" in name for name in names)
    assert objective.teacher is teacher


@pytest.mark.parametrize("kind", ["dinov2", "vjepa2"])
@pytest.mark.parametrize("grid", ["teacher-grid", "native"])
def test_objective_teachers_and_grids(assets, kind, grid):
    objective = AlignmentObjective(_transformer(assets), SCHEDULER, teacher=load_teacher(kind, assets[kind]),
                                   align="mtsa", block_index=2, grid=grid, projector_hidden_dim=16, top_k=0.25)
    latents, prompt, pixels = _batch(batch=1)
    out = objective(latents, prompt, pixels)
    assert torch.isfinite(out["loss"]) and out["align"] > 0
    assert objective.projector.output_grid((3, 6, 6)) == ((4, 2, 2) if grid == "teacher-grid" else (2, 6, 6))


def test_training_steps_lower_the_loss_with_lora_and_checkpointing(assets):
    """A few AdamW steps on a fixed batch (fixed noise and timesteps) lower the total M-TSA objective."""
    from peft import LoraConfig

    torch.manual_seed(0)  # LoRA and projector initialisation
    transformer = _transformer(assets)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    transformer.enable_gradient_checkpointing()
    objective = AlignmentObjective(transformer, SCHEDULER, teacher=load_teacher("videomae", assets["videomae"]),
                                   align="mtsa", block_index=2, projector_hidden_dim=32).train()
    latents, prompt, pixels = _batch()
    fixed = dict(timesteps=torch.tensor([300, 600]), noise=torch.randn(latents.shape,
                                                                        generator=torch.Generator().manual_seed(1)))
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert trainable and all("lora" in n or n.startswith("projector.") for n, p in objective.named_parameters()
                             if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(6):
        out = objective(latents, prompt, pixels, **fixed)
        losses.append((out["loss"].item(), out["diffusion"].item(), out["align"].item()))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert losses[-1][0] < losses[0][0] - 0.015, losses
    assert losses[-1][2] < 0.85 * losses[0][2], losses
    assert all(later[0] < earlier[0] for earlier, later in zip(losses, losses[1:])), losses


def test_projector_save_and_teacher_device_follow(assets, tmp_path):
    teacher = load_teacher("videomae", assets["videomae"])
    objective = AlignmentObjective(_transformer(assets), SCHEDULER, teacher=teacher, align="tsa", block_index=2,
                                   projector_hidden_dim=8)
    objective.save_projector(tmp_path / "projector")
    loaded = AlignmentProjector.from_pretrained(tmp_path / "projector")
    assert loaded.config.in_dim == 32 and loaded.config.out_dim == 24 and loaded.config.hidden_dim == 8
    with pytest.raises(ValueError, match="no projector to save"):
        AlignmentObjective(_transformer(assets), SCHEDULER, align="none").save_projector(tmp_path / "none")


def test_objective_bad_inputs(assets):
    transformer = _transformer(assets)
    teacher = load_teacher("videomae", assets["videomae"])
    latents, prompt, pixels = _batch(batch=1)
    with pytest.raises(ValueError, match="align must be one of"):
        AlignmentObjective(transformer, SCHEDULER, teacher=teacher, align="vjepa")
    with pytest.raises(ValueError, match="needs a frozen teacher"):
        AlignmentObjective(transformer, SCHEDULER, align="mtsa", block_index=1)
    with pytest.raises(ValueError, match=r"block_index must be an int in \[1, 2\]"):
        AlignmentObjective(transformer, SCHEDULER, teacher=teacher, align="tsa")  # default block 18 on a 2-block model
    with pytest.raises(ValueError, match="weight must be a non-negative number"):
        AlignmentObjective(transformer, SCHEDULER, teacher=teacher, align="tsa", block_index=1, weight=-1)
    with pytest.raises(ValueError, match="projector.in_dim=8 must equal the transformer width 32"):
        AlignmentObjective(transformer, SCHEDULER, teacher=teacher, block_index=1,
                           projector=AlignmentProjector(8, 24, 8))
    with pytest.raises(ValueError, match="projector.out_dim=12 must equal the teacher's hidden size 24"):
        AlignmentObjective(transformer, SCHEDULER, teacher=teacher, align="repa", block_index=1,
                           projector=AlignmentProjector(32, 12, 8))
    objective = AlignmentObjective(transformer, SCHEDULER, teacher=teacher, block_index=1, projector_hidden_dim=8)
    with pytest.raises(ValueError, match="needs the pixel video"):
        objective(latents, prompt)
    with pytest.raises(ValueError, match=r"latents must be \(B, F, C, h, w\)"):
        objective(latents[0], prompt, pixels)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B=1, L, D\)"):
        objective(latents, prompt[0], pixels)
    with pytest.raises(ValueError, match=r"pixels must be \(B=1, T, 3, H, W\)"):
        objective(latents, prompt, pixels[0])
    small = _batch(batch=1, size=4)
    with pytest.raises(ValueError, match="too small for spatial_stride=3"):
        objective(*small)
