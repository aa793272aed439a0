"""CogVideoX (diffusers CogVideoXPipeline / CogVideoXTransformer3DModel / AutoencoderKLCogVideoX / T5).

v-prediction through CogVideoXDPMScheduler: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, the model predicts
v = sqrt(ab) eps - sqrt(1 - ab) x0, x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v_hat and the loss is
mean((x0_hat - x0)^2) / (1 - ab) (equal to the v-prediction MSE); t uniform in [0, 1000). Latents are the
VAE's times its scaling_factor, layout (B, F, C, h, w) (the transformer's own). Text: T5, 226 tokens.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from tsa.models.base import ModelFamily, SamplingDefaults, model_index

# Each variant's sampling recipe: diffusers' pipeline defaults, which CogVideoX's own inference/cli_demo.py shares
# (docs/method.md, "Sampling defaults", cites the lines). CogVideoX samples without a negative prompt.
SAMPLING_DEFAULTS = {
    defaults.variant: defaults
    for defaults in (
        SamplingDefaults("cogvideox-2b", 50, 6.0, 8, source="diffusers pipeline_cogvideox.py:514-516,63; "
                         "CogVideo inference/cli_demo.py:62-63,80"),
        SamplingDefaults("cogvideox-5b", 50, 6.0, 8, source="diffusers pipeline_cogvideox.py:514-516,63; "
                         "CogVideo inference/cli_demo.py:62-63,80"),
        SamplingDefaults("cogvideox-5b-i2v", 50, 6.0, 8, source="diffusers pipeline_cogvideox_image2video.py:608-610,"
                         "62; CogVideo inference/cli_demo.py:62-63,80"),
        SamplingDefaults("cogvideox1.5-5b", 50, 6.0, 16, source="CogVideo inference/cli_demo.py:62-63,68,80"),
        SamplingDefaults("cogvideox1.5-5b-i2v", 50, 6.0, 16, source="CogVideo inference/cli_demo.py:62-63,68,80"),
    )
}


def cogvideox_scheduler(snr_shift_scale: float = 3.0):
    """CogVideoXDPMScheduler with CogVideoX's training configuration (v-prediction, zero terminal SNR).

    `snr_shift_scale` is 3.0 for CogVideoX-2B (the tiny models use it) and 1.0 for CogVideoX-5B: load a real
    model's scheduler from its folder instead (CogVideoXFamily().load_scheduler(model_path)).
    """
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        snr_shift_scale=snr_shift_scale,
    )


def rotary_embeddings(transformer, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """3D RoPE (cos, sin) for latents (B, F, C, h, w) of any size, or None for sincos models (2B).

    Uses CogVideoXPipeline's own helper (CogVideoX 1.0 crop-region grid and 1.5 "slice" grid), given
    the latent size directly (spatial VAE factor 1).
    """
    from diffusers import CogVideoXPipeline

    config = CogVideoXFamily().unwrap(transformer).config
    if not config.use_rotary_positional_embeddings:
        return None
    _, frames, _, height, width = latents.shape
    helper = SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor_spatial=1)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(helper, height, width, frames, latents.device)


def sample_timesteps(
    scheduler,
    batch_size: int,
    device,
    generator: torch.Generator | None = None,
    timestep_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps) (or in `timestep_range`), shape (B,)."""
    low, high = timestep_range or (0, scheduler.config.num_train_timesteps)
    gen_device = generator.device if generator is not None else device
    return torch.randint(int(low), int(high), (batch_size,), generator=generator, device=gen_device).to(device)


def diffusion_loss(scheduler, x0_pred: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """mean over the batch of mean((x0_hat - x0)^2) / (1 - alphabar_t): the v-prediction MSE, float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps.to(x0.device)]
    squared_error = (x0_pred.float() - x0.float()).pow(2).flatten(1).mean(1)
    return (squared_error / (1 - alphas_cumprod)).mean()


class CogVideoXFamily(ModelFamily):
    name = "cogvideox"
    pipeline_class_names = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")
    image_pipeline_class_names = ("CogVideoXImageToVideoPipeline",)
    transformer_class_names = ("CogVideoXTransformer3DModel",)
    default_guidance_scale = 6.0
    default_fps = 8
    ffn_lora_target_modules = ("ff.net.0.proj", "ff.net.2")  # the FeedForward's two linear layers
    default_latents = "sample"  # diffusers' CogVideoX training example samples the posterior each step
    presets = {
        # TSA / M-TSA on CogVideoX-2B, full fine-tune (8 GPUs x 4 = global batch 32).
        "cogvideox-2b-mtsa": dict(
            height=480,
            width=720,
            num_frames=49,
            align="mtsa",
            align_layer=18,
            align_weight=0.5,
            tau=0.1,
            top_k=0.2,
            finetune="full",
            learning_rate=2e-6,
            lr_warmup_steps=100,
            train_batch_size=4,
            max_steps=4000,
            checkpointing_steps=500,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            vae_tiling=True,
        ),
        # CogVideoX-5B with LoRA r128 / alpha 64 on the attention projections.
        "cogvideox-5b-lora": dict(
            height=480,
            width=720,
            num_frames=49,
            align="mtsa",
            align_layer=18,
            align_weight=0.5,
            tau=0.1,
            top_k=0.2,
            finetune="lora",
            lora_rank=128,
            lora_alpha=64,
            learning_rate=1e-4,
            lr_warmup_steps=100,
            train_batch_size=1,
            max_steps=2000,
            checkpointing_steps=250,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            vae_tiling=True,
        ),
    }

    # ------------------------------------------------------------------------------------------- sampling
    @staticmethod
    def variant(model_path) -> str:
        """The CogVideoX variant of a pipeline folder (a key of SAMPLING_DEFAULTS), from its configs: 3D sincos
        positions are the 2B, RoPE the 5B, a temporal patch (patch_size_t) CogVideoX1.5; the image-to-video
        pipeline adds "-i2v"."""
        import json

        path = Path(model_path) / "transformer" / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        if config.get("patch_size_t"):
            name = "cogvideox1.5-5b"
        elif config.get("use_rotary_positional_embeddings"):
            name = "cogvideox-5b"
        else:
            name = "cogvideox-2b"
        if model_index(model_path).get("_class_name") == "CogVideoXImageToVideoPipeline":
            name = name.replace("-2b", "-5b") + "-i2v"
        return name

    def sampling_defaults(self, model_path, height=None, width=None) -> SamplingDefaults:
        """CogVideoX's recipe for the variant in `model_path` (see SAMPLING_DEFAULTS and `variant`)."""
        return SAMPLING_DEFAULTS[self.variant(model_path)]

    # ------------------------------------------------------------------------------------------- loading
    def transformer_class(self):
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel

    def pipeline_class(self):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def load_encoders(self, model_path, device="cpu", dtype=torch.float32, tiling=False):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline
        from transformers import AutoTokenizer, T5EncoderModel

        vae = AutoencoderKLCogVideoX.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype).to(device).eval()
        if tiling:
            vae.enable_tiling()
        return CogVideoXPipeline(
            tokenizer=AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer"),
            text_encoder=T5EncoderModel.from_pretrained(model_path, subfolder="text_encoder", torch_dtype=dtype).to(
                device
            ),
            vae=vae,
            transformer=None,
            scheduler=None,
        )

    def max_sequence_length(self, model_path) -> int:
        import json

        config = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
        return int(config.get("max_text_seq_length", 226))

    def normalize_latents(self, latents, vae_config):
        return (latents.float() * vae_config["scaling_factor"]).permute(0, 2, 1, 3, 4)

    def vae_compression(self, vae_config):
        return vae_config.get("temporal_compression_ratio", 4), 2 ** (len(vae_config["block_out_channels"]) - 1)

    # ------------------------------------------------------------------------------------------- structure
    def blocks(self, transformer):
        return self.unwrap(transformer).transformer_blocks

    def token_grid(self, config, latent_shape):
        _, frames, _, height, width = latent_shape
        patch, patch_t = config.patch_size, getattr(config, "patch_size_t", None)
        if patch_t is not None:
            frames = -(-frames // patch_t)
        return frames, height // patch, width // patch

    def text_dim(self, config) -> int:
        return config.text_embed_dim

    def default_align_layer(self, num_blocks: int | None) -> int:
        return 18  # CogVideoX-2B's block 18 of 30 (TSA / VideoREPA); 5B keeps the same index

    def check_latents(self, config, latents):
        patch_t = getattr(config, "patch_size_t", None)
        if patch_t is not None and latents.shape[1] % patch_t:
            raise ValueError(f"latent frames ({latents.shape[1]}) must be a multiple of patch_size_t={patch_t}")

    # ------------------------------------------------------------------------------------------- objective
    def check_scheduler(self, scheduler):
        if scheduler is None:
            raise ValueError(
                "a noise scheduler is required: pass the model's own (CogVideoXFamily().load_scheduler("
                "model_path)); CogVideoX-2B and -5B use different schedules"
            )
        if (
            getattr(scheduler, "alphas_cumprod", None) is None
            or scheduler.config.get("prediction_type") != "v_prediction"
        ):
            raise ValueError(
                f"CogVideoX needs a v-prediction DDPM-style scheduler (CogVideoXDPMScheduler), got "
                f"{type(scheduler).__name__} with prediction_type="
                f"{scheduler.config.get('prediction_type')!r}"
            )

    def sample_timesteps(self, scheduler, batch_size, device, generator=None):
        return sample_timesteps(scheduler, batch_size, device, generator, self.timestep_range)

    # ------------------------------------------------------------------------------------------- image-to-video
    def encode_image_condition(self, encoders, video):
        """The VAE posterior (2C, 1, h, w) of the clip's first frame, as CogVideoXImageToVideoPipeline encodes its
        image (prepare_latents: vae.encode(image[:, :, None]))."""
        first = video[:, :, :1]
        return {"image_latent_dist": encoders.vae.encode(first).latent_dist.parameters[0].contiguous().cpu()}

    def image_condition(self, batch, vae_config, latents):
        """image_latents (B, F, C, h, w) as CogVideoXImageToVideoPipeline.prepare_latents builds them: a sample of
        the first frame's posterior times the VAE scaling factor (its inverse with invert_scale_latents), then
        zero latent frames up to F."""
        if not self.image_to_video:
            return {}
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        image = DiagonalGaussianDistribution(batch["image_latent_dist"].float()).sample()
        scale = vae_config["scaling_factor"]
        image = (image / scale if vae_config.get("invert_scale_latents") else image * scale).permute(0, 2, 1, 3, 4)
        padding = image.new_zeros(image.shape[0], latents.shape[1] - image.shape[1], *image.shape[2:])
        return {"image_latents": torch.cat([image, padding], dim=1).to(latents.dtype)}

    def denoise_and_loss(
        self, transformer, scheduler, latents, prompt_embeds, *, timesteps=None, noise=None, generator=None,
        image_latents=None,
    ):
        """x_t = scheduler.add_noise(x0, eps, t); v_hat = transformer(x_t, prompt, t);
        x0_hat = scheduler.get_velocity(v_hat, x_t, t) = sqrt(ab) x_t - sqrt(1 - ab) v_hat. Image-to-video:
        `image_latents` (B, F, C, h, w, see image_condition) join x_t on the channel axis, as the pipeline's
        transformer input, and CogVideoX1.5's `ofs` is 2.0 as the pipeline passes it."""
        batch = latents.shape[0]
        if timesteps is None:
            timesteps = self.sample_timesteps(scheduler, batch, latents.device, generator)
        timesteps = timesteps.to(device=latents.device, dtype=torch.long)
        if noise is None:
            gen_device = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noisy_latents = scheduler.add_noise(latents, noise.to(latents), timesteps)
        model_input, extra = noisy_latents, {}
        if image_latents is not None:
            model_input = torch.cat([noisy_latents, image_latents.to(noisy_latents)], dim=2)
            if self.unwrap(transformer).config.get("ofs_embed_dim") is not None:
                extra["ofs"] = noisy_latents.new_full((1,), 2.0)
        velocity = transformer(
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=timesteps,
            image_rotary_emb=rotary_embeddings(transformer, latents),
            return_dict=False,
            **extra,
        )[0]
        x0_pred = scheduler.get_velocity(velocity, noisy_latents, timesteps)
        return {
            "loss": diffusion_loss(scheduler, x0_pred, latents, timesteps),
            "x0_pred": x0_pred,
            "timesteps": timesteps,
            "noisy_latents": noisy_latents,
        }

    def x0_from_output(self, scheduler, model_output, sample, timestep, transformer_kwargs=None):
        alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(device=sample.device, dtype=torch.float32)
        return alpha_bar.sqrt() * sample.float() - (1 - alpha_bar).sqrt() * model_output

    # ------------------------------------------------------------------------------------------- tiny models
    def tiny_components(self, num_layers: int = 2, seed: int = 0, rotary: bool = False, i2v: bool = False) -> dict:
        """The five components of a CogVideoXPipeline, tiny and random (the scheduler is CogVideoX-2B's);
        `i2v`: CogVideoX-5B-I2V-style (RoPE, the image latents' channels added to the transformer's input)."""
        from tsa.models.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return {
            "tokenizer": tokenizer,
            "text_encoder": tiny_t5(len(tokenizer), seed=seed),
            "vae": tiny_vae(seed=seed),
            "transformer": tiny_transformer(num_layers=num_layers, rotary=rotary or i2v, seed=seed, i2v=i2v),
            "scheduler": cogvideox_scheduler(),
        }

    def tiny_pipeline_class(self, i2v: bool = False, **options):
        from diffusers import CogVideoXImageToVideoPipeline

        return CogVideoXImageToVideoPipeline if i2v else self.pipeline_class()


def tiny_transformer(num_layers: int = 2, latent_channels: int = 4, rotary: bool = False, seed: int = 0,
                     i2v: bool = False):
    """CogVideoXTransformer3DModel: 2 heads x 16 dims; `rotary=True` mimics the 5B (3D RoPE) layout, `i2v` the
    5B-I2V's input (noisy and image latents concatenated: twice the channels in)."""
    from diffusers import CogVideoXTransformer3DModel

    from tsa.models.tiny import TINY_TEXT_DIM, TINY_TEXT_LENGTH

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=2 * latent_channels if i2v else latent_channels,
        out_channels=latent_channels,
        time_embed_dim=16,
        text_embed_dim=TINY_TEXT_DIM,
        num_layers=num_layers,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TINY_TEXT_LENGTH,
        use_rotary_positional_embeddings=rotary,
    )


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    """AutoencoderKLCogVideoX with the real 8x spatial / 4x temporal compression and 8-channel blocks."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=64,
    ).eval()


def tiny_t5(vocab_size: int, seed: int = 0):
    """A 2-layer T5 encoder with d_model = TINY_TEXT_DIM."""
    from transformers import T5Config, T5EncoderModel

    from tsa.models.tiny import TINY_TEXT_DIM

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config).eval()
