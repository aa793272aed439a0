"""Block feature capture on a real (tiny) CogVideoXTransformer3DModel, and the alignment projector."""

import pytest
import torch

from tsa.features import BlockFeatureCapture, resample_features, token_grid
from tsa.models.cogvideox import tiny_transformer
from tsa.models.tiny import TINY_TEXT_DIM, TINY_TEXT_LENGTH
from tsa.projector import AlignmentProjector

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    path = tmp_path_factory.mktemp("transformer")
    tiny_transformer(num_layers=3).save_pretrained(path)
    return diffusers.CogVideoXTransformer3DModel.from_pretrained(path)


def _inputs(batch=2, frames=3, height=6, width=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, height, width, generator=generator)
    prompt = torch.randn(batch, TINY_TEXT_LENGTH, TINY_TEXT_DIM, generator=generator)
    return latents, prompt, torch.tensor([10, 700][:batch])


def _call(model, latents, prompt, timesteps):
    return model(hidden_states=latents, encoder_hidden_states=prompt, timestep=timesteps, return_dict=False)[0]


def test_last_block_capture_reproduces_the_output(transformer):
    """Block L's captured tokens, run through the model's own output head, give the model's output."""
    latents, prompt, timesteps = _inputs()
    with BlockFeatureCapture(transformer, block_index=3) as capture:
        output = _call(transformer, latents, prompt, timesteps)
    features = capture.features
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert features.shape == (2, 3, 3, 5, width)
    emb = transformer.time_embedding(transformer.time_proj(timesteps).to(latents.dtype))
    tokens = transformer.proj_out(transformer.norm_out(transformer.norm_final(features.flatten(1, 3)), temb=emb))
    patches = tokens.view(2, 3, 3, 5, 4, 2, 2).permute(0, 1, 4, 2, 5, 3, 6).reshape(output.shape)
    torch.testing.assert_close(patches, output)


def test_capture_only_inside_the_context(transformer):
    latents, prompt, timesteps = _inputs(batch=1)
    capture = BlockFeatureCapture(transformer, 1)
    with pytest.raises(RuntimeError, match="no features"):
        _ = capture.features
    with capture:
        _call(transformer, latents, prompt, timesteps)
    first = capture.features
    _call(transformer, latents * 2, prompt, timesteps)  # hooks removed: nothing overwritten
    assert capture.features is first
    assert not transformer.transformer_blocks[0]._forward_hooks


@pytest.mark.parametrize("block_index", [0, 4, -1, 1.0, True])
def test_bad_block_index(transformer, block_index):
    with pytest.raises(ValueError, match=r"block_index must be an int in \[1, 3\] \(the transformer has 3 blocks"):
        BlockFeatureCapture(transformer, block_index)


def test_not_a_transformer():
    with pytest.raises(TypeError, match="CogVideoXTransformer3DModel"):
        BlockFeatureCapture(torch.nn.Linear(2, 2), 1)


def test_gradient_checkpointing_keeps_features_and_gradients():
    model = tiny_transformer(num_layers=3)
    latents, prompt, timesteps = _inputs()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        with BlockFeatureCapture(model, 2) as capture:
            _call(model, latents, prompt, timesteps)
        assert capture.features.requires_grad
        capture.features.square().mean().backward()
        grads.append((capture.features.detach(), model.transformer_blocks[0].attn1.to_q.weight.grad.clone()))
        assert model.transformer_blocks[2].attn1.to_q.weight.grad is None  # after the hooked block
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_peft_lora_adapters():
    from peft import LoraConfig, get_peft_model

    latents, prompt, timesteps = _inputs(batch=1)
    model = tiny_transformer(num_layers=2)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    with BlockFeatureCapture(model, 2) as capture:
        _call(model, latents, prompt, timesteps)
    capture.features.sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n and "transformer_blocks.0." in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)

    wrapped = get_peft_model(tiny_transformer(num_layers=2), LoraConfig(r=2, target_modules=["to_q"]))
    with BlockFeatureCapture(wrapped, 1) as capture:
        wrapped(hidden_states=latents, encoder_hidden_states=prompt, timestep=timesteps)
    assert capture.features.shape == (1, 3, 3, 5, 32)  # tiny width: 2 heads x 16


def test_token_grid_with_temporal_patch():
    from diffusers.configuration_utils import FrozenDict  # a diffusers model's .config: a mapping with attributes

    config = {"_class_name": "CogVideoXTransformer3DModel", "patch_size": 2}
    assert token_grid(FrozenDict(config, patch_size_t=2), (1, 5, 16, 6, 8)) == (3, 3, 4)
    assert token_grid(FrozenDict(config, patch_size_t=None), (1, 5, 16, 6, 8)) == (5, 3, 4)


def test_resample_features():
    x = torch.randn(2, 3, 4, 5, 6)
    assert resample_features(x, (3, 4, 5)) is x
    y = resample_features(x, (6, 8, 10))
    assert y.shape == (2, 6, 8, 10, 6)
    torch.testing.assert_close(resample_features(x[:, :1, :1, :1].expand(2, 3, 4, 5, 6), (2, 2, 2)),
                               x[:, :1, :1, :1].expand(2, 2, 2, 2, 6))
    with pytest.raises(ValueError, match="grid must be three positive sizes"):
        resample_features(x, (0, 2, 2))


def test_projector_teacher_grid_spec_shape():
    """docs/method.md, features: 13 x 30 x 45 DiT tokens -> 24 x 10 x 15 (teacher-grid) or 12 x 30 x 45 (native)."""
    features = torch.randn(1, 13, 30, 45, 6)
    projector = AlignmentProjector(6, out_dim=5, hidden_dim=7)
    assert projector.teacher_grid((13, 30, 45)) == (24, 10, 15)
    assert projector(features).shape == (1, 24, 10, 15, 5)
    native = AlignmentProjector(6, out_dim=5, hidden_dim=7, grid="native")
    assert native.teacher_grid((13, 30, 45)) == (24, 10, 15)
    assert native(features).shape == (1, 12, 30, 45, 5)
    assert native.output_grid((13, 30, 45)) == (12, 30, 45)


def test_projector_layers_follow_spec():
    projector = AlignmentProjector(6, out_dim=5, hidden_dim=7)
    assert [type(m).__name__ for m in projector.mlp] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [tuple(m.weight.shape) for m in projector.mlp[::2]] == [(7, 6), (7, 7), (5, 7)]
    assert projector.downsample.kernel_size == (3, 3) and projector.downsample.stride == (3, 3)
    # frame-wise conv after a x2 temporal upsample of frames 1.. (frame 0 dropped)
    features = torch.randn(2, 3, 6, 3, 6)
    projected = projector.mlp(features[:, 1:])
    up = torch.nn.functional.interpolate(projected.permute(0, 4, 1, 2, 3), scale_factor=(2, 1, 1), mode="trilinear")
    expected = projector.downsample(up.transpose(1, 2).flatten(0, 1)).view(2, 4, 5, 2, 1).permute(0, 1, 3, 4, 2)
    torch.testing.assert_close(projector(features), expected)


def test_projector_save_load(tmp_path):
    projector = AlignmentProjector(6, out_dim=5, hidden_dim=7, grid="native", spatial_stride=2)
    projector.save_pretrained(tmp_path)
    loaded = AlignmentProjector.from_pretrained(tmp_path)
    assert loaded.grid == "native" and loaded.spatial_stride == 2
    features = torch.randn(1, 2, 4, 4, 6)
    torch.testing.assert_close(loaded(features), projector(features))


def test_projector_bad_inputs():
    with pytest.raises(ValueError, match="grid must be one of"):
        AlignmentProjector(6, grid="dit")
    projector = AlignmentProjector(6, out_dim=5, hidden_dim=7)
    with pytest.raises(ValueError, match=r"features must be \(B, F, H, W, 6\)"):
        projector(torch.randn(1, 3, 6, 6, 4))
    with pytest.raises(ValueError, match="too small for spatial_stride=3"):
        projector(torch.randn(1, 3, 2, 2, 6))
    with pytest.raises(ValueError, match="latent frame 0 is dropped"):
        projector(torch.randn(1, 1, 6, 6, 6))
