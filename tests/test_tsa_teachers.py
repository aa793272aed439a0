"""Teachers loaded from tiny real transformers folders, and the official VideoMAEv2 checkpoint converter."""

import pytest
import torch

from tsa.cli.convert_videomae import main
from tsa.teachers import load_teacher, resize_video
from tsa.teachers.videomae import POSITION_TABLE_FILE, convert_videomae_v2_checkpoint, resample_position_table
from tsa.tiny import tiny_dinov2, tiny_videomae, tiny_vjepa2

transformers = pytest.importorskip("transformers")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "videomae": tiny_videomae(root / "videomae", image_size=32, num_frames=4),
        "dinov2": tiny_dinov2(root / "dinov2"),
        "vjepa2": tiny_vjepa2(root / "vjepa2", crop_size=32, frames_per_clip=4),
    }


def _pixels(batch=2, frames=9, height=40, width=56, seed=0):
    return torch.rand(batch, frames, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _model_input(pixels, frames, height, width, mode="bicubic"):
    """An image processor's order: resize (antialiased, clamped like uint8 frames), rescale, normalise."""
    video = resize_video(pixels[:, 1:], frames, height, width, mode=mode)
    return ((video + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD


def _videorepa_features(model, pixels, grid):
    """VideoREPA's released recipe, written out independently of tsa: (x+1)/2, Normalize, drop frame 0, plain
    F.interpolate bicubic; VideoMAEv2.interpolate_pos_embed (bicubic per temporal slice, then trilinear with H, W
    kept); patch embedding + table, blocks, no final norm."""
    batch, frames, channels, height, width = pixels.shape
    raw = (pixels.flatten(0, 1) + 1.0) / 2.0
    raw = torchvision_normalize(raw, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    raw = raw.reshape(batch, frames, channels, height, width)[:, 1:]
    size = (grid[1] * 16, grid[2] * 16)
    raw = torch.nn.functional.interpolate(raw.flatten(0, 1), size, mode="bicubic").reshape(batch, frames - 1, 3, *size)
    config = model.config
    t0, h0 = config.num_frames // config.tubelet_size, config.image_size // config.patch_size
    pos = model.embeddings.position_embeddings.reshape(-1, t0, h0, h0, 24).reshape(-1, h0, h0, 24).permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos, size=grid[1:], mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(-1, t0, *grid[1:], 24).permute(0, 4, 1, 2, 3)
    pos = torch.nn.functional.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
    pos = pos.permute(0, 2, 3, 4, 1).flatten(1, 3)
    with torch.no_grad():
        tokens = model.embeddings.patch_embeddings.projection(raw.transpose(1, 2)).flatten(2).transpose(1, 2)
        return model.encoder(tokens + pos).last_hidden_state.view(batch, *grid, 24)


def torchvision_normalize(frames, mean, std):
    return (frames - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("kind", ["videomae", "dinov2", "vjepa2"])
def test_teacher_is_frozen_and_shapes(folders, kind):
    teacher = load_teacher(kind, folders[kind])
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    pixels = _pixels().requires_grad_()
    features = teacher(pixels, grid=(3, 2, 5))
    assert features.shape == (2, 3, 2, 5, 24) and not features.requires_grad
    assert torch.isfinite(features).all()


def test_default_grids(folders):
    pixels = _pixels(frames=9, height=42, width=70)
    assert load_teacher("videomae", folders["videomae"])(pixels).shape == (2, 2, 2, 2, 24)  # config: 4 x 32 x 32
    assert load_teacher("dinov2", folders["dinov2"])(pixels).shape == (2, 8, 3, 5, 24)  # per frame, patch 14
    assert load_teacher("vjepa2", folders["vjepa2"])(pixels).shape == (2, 4, 2, 2, 24)  # tubelet 2, crop 32


def test_videomae_is_last_block_without_final_norm(folders):
    """tiny_videomae has use_mean_pooling=False, so VideoMAEModel applies a final LayerNorm: the teacher must not."""
    teacher = load_teacher("videomae", folders["videomae"])
    model = transformers.VideoMAEModel.from_pretrained(folders["videomae"]).eval()
    pixels = _pixels()
    video = teacher.preprocess(pixels, (2, 2, 2))
    with torch.no_grad():
        outputs = model(pixel_values=video, output_hidden_states=True)
    expected = outputs.hidden_states[-1].view(2, 2, 2, 2, 24)
    torch.testing.assert_close(teacher(pixels), expected)
    assert not torch.allclose(outputs.last_hidden_state.view(2, 2, 2, 2, 24), expected, atol=1e-3)


@pytest.mark.parametrize("grid", [(2, 2, 2), (3, 2, 3), (4, 3, 2)])
def test_videomae_matches_videorepa_recipe(folders, grid):
    """Features equal an independent transcription of VideoREPA's preprocessing and position-table resampling
    (downsampled in space here, so antialiasing, clamping or a one-pass trilinear table would show)."""
    teacher = load_teacher("videomae", folders["videomae"])
    model = transformers.VideoMAEModel.from_pretrained(folders["videomae"]).eval()
    pixels = _pixels(frames=2 * grid[0] + 1, height=40, width=56)
    expected = _videorepa_features(model, pixels, grid)
    torch.testing.assert_close(teacher(pixels, grid=grid), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher(pixels, grid=grid), teacher(pixels.double(), grid=grid))  # fp32 inside


def test_videomae_runs_in_fp32_under_autocast(folders):
    teacher = load_teacher("videomae", folders["videomae"])
    assert teacher.model.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    pixels = _pixels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = teacher(pixels, grid=(3, 2, 3))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, teacher(pixels, grid=(3, 2, 3)))
    half = load_teacher("videomae", folders["videomae"], dtype=torch.bfloat16)
    assert half(pixels).dtype == torch.bfloat16


def test_position_table_bicubic_in_space_then_linear_in_time():
    table = torch.randn(1, 2 * 3 * 4, 5, generator=torch.Generator().manual_seed(0))
    out = resample_position_table(table, (2, 3, 4), (5, 3, 4))  # time only: linear, align_corners=False
    volume = table.view(2, 12, 5)
    weights = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])  # source position (i + 0.5) * 2 / 5 - 0.5, clamped
    expected = volume[0] + (weights.view(5, 1, 1) * (volume[1] - volume[0]))
    torch.testing.assert_close(out.view(5, 12, 5), expected)
    spatial = resample_position_table(table, (2, 3, 4), (2, 5, 6))  # space only: bicubic per slice
    planes = torch.nn.functional.interpolate(table.view(2, 3, 4, 5).permute(0, 3, 1, 2), size=(5, 6), mode="bicubic")
    torch.testing.assert_close(spatial, planes.permute(0, 2, 3, 1).reshape(1, -1, 5))
    assert torch.equal(resample_position_table(table, (2, 3, 4), (2, 3, 4)), table)


def test_dinov2_patch_tokens_per_frame(folders):
    teacher = load_teacher("dinov2", folders["dinov2"])
    model = transformers.Dinov2Model.from_pretrained(folders["dinov2"]).eval()
    pixels = _pixels()
    video = _model_input(pixels, 3, 28, 42)
    with torch.no_grad():
        expected = model(pixel_values=video.flatten(0, 1)).last_hidden_state[:, 1:].reshape(2, 3, 2, 3, 24)
    torch.testing.assert_close(teacher(pixels, grid=(3, 2, 3)), expected)


def test_vjepa2_square_crop_then_resampled(folders):
    teacher = load_teacher("vjepa2", folders["vjepa2"])
    model = transformers.VJEPA2Model.from_pretrained(folders["vjepa2"]).eval()
    pixels = _pixels()
    video = _model_input(pixels, 6, 32, 32, mode="bilinear")
    with torch.no_grad():
        square = model(pixel_values_videos=video, skip_predictor=True).last_hidden_state.view(2, 3, 2, 2, 24)
    torch.testing.assert_close(teacher(pixels, grid=(3, 2, 2)), square)
    assert teacher(pixels, grid=(3, 4, 6)).shape == (2, 3, 4, 6, 24)


def test_resize_video_frames_and_size():
    pixels = torch.arange(8.0).view(1, 8, 1, 1, 1).expand(1, 8, 3, 4, 6) / 8
    assert torch.equal(resize_video(pixels, 8, 4, 6), pixels)
    assert resize_video(pixels, 4, 4, 6)[0, :, 0, 0, 0].tolist() == [1 / 8, 3 / 8, 5 / 8, 7 / 8]  # frame centres
    resized = resize_video(pixels * 8 - 1, 8, 9, 5)
    assert resized.shape == (1, 8, 3, 9, 5) and resized.abs().max() <= 1
    noise = _pixels(batch=1, frames=2, height=12, width=12)
    plain = resize_video(noise, 2, 5, 7, antialias=False, clamp=False)
    expected = torch.nn.functional.interpolate(noise[0], size=(5, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(plain[0], expected)
    assert plain.abs().max() > 1  # bicubic overshoots; clamp=False keeps it


def test_teacher_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="videomae teacher path .*does not exist"):
        load_teacher("videomae", tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_teacher("videomae", tmp_path)
    with pytest.raises(ValueError, match="holds a 'dinov2' model, expected model_type in \\('videomae',\\)"):
        load_teacher("videomae", folders["dinov2"])
    with pytest.raises(ValueError, match="kind must be one of"):
        load_teacher("clip", folders["dinov2"])
    teacher = load_teacher("dinov2", folders["dinov2"])
    with pytest.raises(ValueError, match=r"pixels must be \(B, T, 3, H, W\)"):
        teacher(torch.zeros(1, 4, 4, 28, 28))
    with pytest.raises(TypeError, match="floating"):
        teacher(torch.zeros(1, 4, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        teacher(torch.zeros(1, 1, 3, 28, 28))
    with pytest.raises(ValueError, match="grid must be three positive ints"):
        teacher(torch.zeros(1, 4, 3, 28, 28), grid=(2, 0, 2))


# ---- converter ---------------------------------------------------------------------------------


def _official_state_dict(model, layer_scale=None):
    """The VideoMAEv2 (timm-style) names of a transformers VideoMAEModel's weights."""
    weights = model.state_dict()
    official = {
        "patch_embed.proj.weight": weights["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": weights["embeddings.patch_embeddings.projection.bias"],
        "fc_norm.weight": torch.ones(24), "fc_norm.bias": torch.zeros(24),
        "head.weight": torch.zeros(7, 24), "head.bias": torch.zeros(7),
    }
    if "layernorm.weight" in weights:
        official["norm.weight"], official["norm.bias"] = weights["layernorm.weight"], weights["layernorm.bias"]
    for i in range(model.config.num_hidden_layers):
        ours = {name.removeprefix(f"encoder.layer.{i}."): value for name, value in weights.items()
                if name.startswith(f"encoder.layer.{i}.")}
        qkv = [ours[f"attention.attention.{name}.weight"] for name in ("query", "key", "value")]
        official.update({
            f"blocks.{i}.norm1.weight": ours["layernorm_before.weight"],
            f"blocks.{i}.norm1.bias": ours["layernorm_before.bias"],
            f"blocks.{i}.attn.qkv.weight": torch.cat(qkv),
            f"blocks.{i}.attn.q_bias": ours["attention.attention.query.bias"],
            f"blocks.{i}.attn.v_bias": ours["attention.attention.value.bias"],
            f"blocks.{i}.attn.proj.weight": ours["attention.output.dense.weight"],
            f"blocks.{i}.attn.proj.bias": ours["attention.output.dense.bias"],
            f"blocks.{i}.norm2.weight": ours["layernorm_after.weight"],
            f"blocks.{i}.norm2.bias": ours["layernorm_after.bias"],
            f"blocks.{i}.mlp.fc1.weight": ours["intermediate.dense.weight"],
            f"blocks.{i}.mlp.fc1.bias": ours["intermediate.dense.bias"],
            f"blocks.{i}.mlp.fc2.weight": ours["output.dense.weight"],
            f"blocks.{i}.mlp.fc2.bias": ours["output.dense.bias"],
        })
        if layer_scale is not None:  # gamma * proj(x) with proj / gamma == the original projection
            for gamma, name in (("gamma_1", "attn.proj"), ("gamma_2", "mlp.fc2")):
                official[f"blocks.{i}.{gamma}"] = layer_scale
                official[f"blocks.{i}.{name}.weight"] = official[f"blocks.{i}.{name}.weight"] / layer_scale[:, None]
                official[f"blocks.{i}.{name}.bias"] = official[f"blocks.{i}.{name}.bias"] / layer_scale
    return official


@pytest.fixture(scope="module")
def original(folders):
    return transformers.VideoMAEModel.from_pretrained(folders["videomae"]).eval()


def test_converter_round_trip(original, folders, tmp_path):
    checkpoint = tmp_path / "videomaev2.pth"
    torch.save({"model": _official_state_dict(original)}, checkpoint)
    same_grid = dict(num_frames=4, image_size=(32, 32), source_num_frames=4, source_image_size=32,
                     num_attention_heads=2)
    out = convert_videomae_v2_checkpoint(checkpoint, tmp_path / "same", layer_norm_eps=1e-12, **same_grid)
    converted = transformers.VideoMAEModel.from_pretrained(out).eval()
    assert converted.config.hidden_size == 24 and converted.config.num_hidden_layers == 2
    assert converted.config.intermediate_size == 48 and not converted.config.use_mean_pooling
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixel_values=video).last_hidden_state,
                                   original(pixel_values=video).last_hidden_state)
    pixels = _pixels()
    reference = load_teacher("videomae", folders["videomae"])
    torch.testing.assert_close(load_teacher("videomae", out)(pixels), reference(pixels))
    # a new grid: the converter's resampled table == the teacher's runtime resampling of the same sinusoid
    out = convert_videomae_v2_checkpoint(checkpoint, tmp_path / "new", num_frames=6, image_size=(16, 48),
                                         source_num_frames=4, source_image_size=32, layer_norm_eps=1e-12,
                                         num_attention_heads=2)
    torch.testing.assert_close(load_teacher("videomae", out)(pixels), reference(pixels, grid=(3, 1, 3)))


def test_converter_learned_table_and_layer_scale(original, tmp_path):
    """pos_embed + gamma + 'module' nesting + 'module.' prefix; the table is stored as built, with its grid."""
    pos_embed = torch.randn(1, 8, 24)
    state = {"module." + key: value for key, value in _official_state_dict(original, torch.rand(24) + 0.5).items()}
    state["module.pos_embed"] = pos_embed
    out = convert_videomae_v2_checkpoint({"module": state, "epoch": 3}, tmp_path / "out", num_frames=6,
                                         image_size=(16, 48), source_num_frames=4, source_image_size=32,
                                         layer_norm_eps=1e-12, num_attention_heads=2)
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(out / POSITION_TABLE_FILE))["position_table"], pos_embed)  # as built
    with safe_open(str(out / POSITION_TABLE_FILE), framework="pt") as handle:
        assert handle.metadata() == {"grid": "2,2,2"}
    teacher = load_teacher("videomae", out)
    assert teacher.source_grid == (3, 1, 3) and teacher.model.config.image_size == [16, 48]
    assert teacher.position_grid == (2, 2, 2)
    table = resample_position_table(pos_embed, (2, 2, 2), (3, 1, 3))  # once, at load
    torch.testing.assert_close(teacher.model.embeddings.position_embeddings, table)
    video = torch.randn(1, 6, 3, 16, 48)
    with torch.no_grad():
        tokens = teacher.model.embeddings.patch_embeddings(video) + table
        torch.testing.assert_close(teacher.model.encoder(tokens).last_hidden_state,
                                   original.encoder(tokens).last_hidden_state)
    assert teacher(_pixels()).shape == (2, 3, 1, 3, 24)


def test_converter_cli_and_bad_checkpoints(original, tmp_path):
    state = _official_state_dict(original)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    main([str(tmp_path / "ckpt.pth"), str(tmp_path / "cli"), "--num-frames", "4", "--image-size", "32", "48",
          "--source-num-frames", "4", "--source-image-size", "32", "--num-attention-heads", "2"])
    config = transformers.VideoMAEConfig.from_pretrained(tmp_path / "cli")
    assert config.image_size == [32, 48] and config.layer_norm_eps == 1e-6 and config.num_attention_heads == 2
    with pytest.raises(ValueError, match="hidden size 24 is not a multiple of 64: pass num_attention_heads"):
        convert_videomae_v2_checkpoint(state, tmp_path / "e", num_frames=4, image_size=(32, 32))
    with pytest.raises(ValueError, match="unsupported key 'blocks.0.attn.scale'"):
        convert_videomae_v2_checkpoint({**state, "blocks.0.attn.scale": torch.ones(1)}, tmp_path / "a",
                                       num_frames=4, image_size=(32, 32), source_num_frames=4, source_image_size=32)
    with pytest.raises(ValueError, match="no 'patch_embed.proj.weight'"):
        convert_videomae_v2_checkpoint({"model": {"blocks.0.norm1.weight": torch.ones(2)}}, tmp_path / "b")
    with pytest.raises(ValueError, match="num_frames=5 must be a positive multiple"):
        convert_videomae_v2_checkpoint(state, tmp_path / "c", num_frames=5, image_size=(32, 32), num_attention_heads=2)
    with pytest.raises(ValueError, match="position table has 8 positions"):
        convert_videomae_v2_checkpoint({**state, "pos_embed": torch.zeros(1, 8, 24)}, tmp_path / "d",
                                       num_frames=4, image_size=(32, 32), num_attention_heads=2)
