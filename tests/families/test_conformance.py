"""The model-family contract (tsa.models.base.ModelFamily), checked on the tiny random models of every registered
family: a family added to tsa.models.FAMILIES gets this whole suite by registering.

Each test uses the family object only (no family name, no family-specific layout): tiny build and detection,
the token grid of the aligned block, one objective step per alignment method and LaMo's drift loss, LoRA saved
by the family and loaded with the pipeline's own load_lora_weights, one sampling step, and LaMo's x0 estimate
in the pipeline's layout against the training objective's.
"""

import dataclasses

import pytest
import torch

from tsa.alignment import ALIGNMENT_METHODS
from tsa.features import BlockFeatureCapture
from tsa.models import FAMILIES, detect_family, detect_family_name, family_for_pipeline, family_of, get_family
from tsa.objective import AlignmentObjective
from tsa.teachers import load_teacher
from tsa.tiny import tiny_videomae
from tsa.training.config import PRESETS, TrainConfig

NUM_LAYERS, BLOCK = 3, 2  # tiny transformers of 3 blocks, aligned at block 2 (block 3 comes after it)


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    """(family, pipeline folder) of a tiny random pipeline of each registered family."""
    family = get_family(request.param)
    path = family.save_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{family.name}"), num_layers=NUM_LAYERS)
    return family, path


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return tiny_videomae(tmp_path_factory.mktemp("videomae"))


def _clip_size(family) -> tuple[int, int, int]:
    """Pixel frames, height and width of a small clip the family takes: 3 latent frames, a 6 x 5 grid of the
    VAE x patch multiple (height != width, so a transposed grid shows)."""
    return 2 * family.temporal_compression + 1, 6 * family.spatial_multiple, 5 * family.spatial_multiple


def _inputs(family, path, transformer, batch=2, seed=0):
    """Latents (B, F, C, h, w), prompt embeddings (B, L, D) and pixels (B, T, 3, H, W) in [-1, 1] of the family."""
    generator = torch.Generator().manual_seed(seed)
    num_frames, pixel_height, pixel_width = _clip_size(family)
    _, frames, channels, height, width = family.latent_shape(path, num_frames, pixel_height, pixel_width)
    latents = torch.randn(batch, frames, channels, height, width, generator=generator)
    length, dim = family.max_sequence_length(path), family.text_dim(transformer.config)
    prompt = torch.randn(batch, length, dim, generator=generator)
    pixels = torch.rand(batch, num_frames, 3, pixel_height, pixel_width, generator=generator) * 2 - 1
    return latents, prompt, pixels


def _x0(family, transformer, scheduler, latents, prompt, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return family.denoise_and_loss(transformer, scheduler, latents, prompt, generator=generator)["x0_pred"].float()


def test_tiny_pipeline_is_found_by_folder_pipeline_and_transformer(tiny):
    family, path = tiny
    assert detect_family_name(path) == family.name and type(detect_family(path)) is type(family)
    pipe = family.load_pipeline(path)
    assert type(pipe).__name__ in family.pipeline_class_names and family_for_pipeline(pipe).name == family.name
    assert family_of(pipe.transformer).name == family.name and family.unwrap(pipe.transformer) is pipe.transformer
    assert "transformer" in family.experts and all(hasattr(pipe, expert) for expert in family.experts)
    num_frames = _clip_size(family)[0]
    assert family.check_frames(num_frames) is None and family.check_frames(num_frames + 1)


def test_family_options_and_presets_are_run_config_fields(tiny):
    family, _ = tiny
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(family.objective_options) <= fields  # the command line and TrainConfig can set every one
    for name, values in family.presets.items():
        assert PRESETS[name]["model_family"] == family.name and set(values) <= fields
        assert family.check_frames(values.get("num_frames", 49)) is None
    assert family.default_guidance_scale >= 0 and family.default_fps >= 1


def test_token_grid_is_the_grid_of_the_block_output(tiny):
    family, path = tiny
    transformer = family.load_transformer(path)
    latents, prompt, _ = _inputs(family, path, transformer, batch=1)
    scheduler = family.load_scheduler(path)
    with BlockFeatureCapture(transformer, BLOCK, family=family) as capture, torch.no_grad():
        family.denoise_and_loss(transformer, scheduler, latents, prompt, generator=torch.Generator().manual_seed(0))
    grid = family.token_grid(transformer.config, tuple(latents.shape))
    assert capture.features.shape == (1, *grid, family.width(transformer.config))
    assert len(family.blocks(transformer)) == NUM_LAYERS


@pytest.mark.parametrize("method", [*ALIGNMENT_METHODS, "lamo"])
def test_one_objective_step_per_alignment_method(tiny, teacher_path, method):
    """diffusion + 0.5 * align (or LaMo's drift loss) on the family's objective; the alignment gradient reaches
    the blocks up to the aligned one and none after it."""
    family, path = tiny
    transformer = family.load_transformer(path)
    scheduler = family.load_scheduler(path)
    align = "none" if method == "lamo" else method
    teacher = None if align == "none" else load_teacher("videomae", teacher_path)
    objective = AlignmentObjective(transformer, scheduler, teacher, align=align, block_index=BLOCK,
                                   projector_hidden_dim=16, family=family)
    latents, prompt, pixels = _inputs(family, path, transformer)
    torch.manual_seed(0)
    out = objective(latents, prompt, pixels if teacher is not None else None)
    first, after = family.blocks(transformer)[0], family.blocks(transformer)[BLOCK]
    if method == "lamo":
        from tsa.lamo import LaMoTrainer, MotionPredictor

        predictor = MotionPredictor(in_channels=family.latent_channels(transformer.config), channels=8, num_blocks=1,
                                    text_dim=family.text_dim(transformer.config))
        lamo = LaMoTrainer(predictor, total_steps=2, noise_scheduler=scheduler)
        drift = lamo.drift_loss(out["x0_pred"].float(), out["x0"].float(), out["timesteps"])
        assert torch.isfinite(drift) and drift > 0
        drift.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in after.parameters())
        assert lamo.step(latents, prompt) > 0
        return
    torch.testing.assert_close(out["loss"], out["diffusion"] + 0.5 * out["align"])
    assert torch.isfinite(out["loss"]) and out["align"].item() != 0
    out["align"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert all(p.grad is None for p in after.parameters())


def test_lora_saved_by_the_family_loads_with_the_pipelines_own_loader(tiny, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family, path = tiny
    base = family.load_transformer(path)
    adapted = family.load_transformer(path)
    adapted.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(family.default_lora_target_modules)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # zero at initialisation: give the adapters an effect
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    family.save_lora_weights(tmp_path, get_peft_model_state_dict(adapted), adapted.peft_config["default"].to_dict())
    pipe = family.pipeline_class().from_pretrained(path)
    pipe.load_lora_weights(tmp_path)
    scheduler = family.load_scheduler(path)
    latents, prompt, _ = _inputs(family, path, base, batch=1)
    expected = _x0(family, adapted, scheduler, latents, prompt)
    loaded = _x0(family, pipe.transformer, scheduler, latents, prompt)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    alone = family.load_trained_transformer(tmp_path, path)
    torch.testing.assert_close(_x0(family, alone, scheduler, latents, prompt), expected, rtol=1e-5, atol=1e-6)
    assert (expected - _x0(family, base, scheduler, latents, prompt)).abs().max() > 1e-4


def test_one_sampling_step_through_the_pipeline(tiny):
    family, path = tiny
    pipe = family.load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    num_frames, height, width = _clip_size(family)
    # Two steps: with one, a scheduler stretched to a terminal sigma (shift_terminal) divides by zero.
    latents = pipe("a red ball falls", num_inference_steps=2, num_frames=num_frames, height=height, width=width,
                   guidance_scale=family.default_guidance_scale, generator=torch.Generator().manual_seed(0),
                   output_type="latent").frames  # decoding is tsa-sample's end-to-end test's
    shape = family.latent_shape(path, num_frames, height, width)
    assert sorted(latents.shape) == sorted(shape) and latents.numel() == torch.Size(shape).numel()
    assert torch.isfinite(latents).all() and latents.std() > 0


def test_lamo_x0_of_a_sampling_step_is_the_training_objectives(tiny):
    """x0_from_output on the transformer's own input and output at a sampling timestep equals the x0 estimate of
    denoise_and_loss at that timestep (Motion Prior Guidance scores what training aligned)."""
    family, path = tiny
    transformer = family.load_transformer(path).eval()
    scheduler = family.load_scheduler(path)
    latents, prompt, _ = _inputs(family, path, transformer)
    family.set_sampling_timesteps(scheduler, 10, tuple(latents.shape))
    timestep = scheduler.timesteps[3]
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(sample=kwargs["hidden_states"], output=output[0], kwargs=kwargs)

    handle = transformer.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        out = family.denoise_and_loss(transformer, scheduler, latents, prompt,
                                      timesteps=timestep.expand(latents.shape[0]), noise=torch.randn_like(latents))
    handle.remove()
    x0 = family.x0_from_output(scheduler, seen["output"], seen["sample"], timestep, seen["kwargs"])
    assert x0.shape == latents.shape
    torch.testing.assert_close(x0, out["x0_pred"].float(), rtol=1e-5, atol=1e-5)
