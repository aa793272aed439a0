"""Wan2.1 / Wan2.2 (diffusers WanPipeline / WanTransformer3DModel / AutoencoderKLWan / UMT5).

Rectified flow: for t in [0, 1000), sigma = t / 1000, x_t = (1 - sigma) x0 + sigma * eps; the model predicts
v ~ eps - x0; loss = batch mean of per-sample mean((v_hat - (eps - x0))^2); x0_hat = x_t - sigma * v_hat.
Training timesteps: u ~ logit-normal(mean 0, std 1) (or uniform), sigma = shift * u / (1 + (shift - 1) u)
with the scheduler's shift, t = 1000 sigma (continuous), as diffusers' flow-matching training examples
(their u indexes a 1000-step table; here sigma is not discretised).

Latents: the VAE sample normalised per channel, (z - latents_mean) / latents_std, given to tsa as
(B, F, C, h, w) (the transformer's own layout is (B, C, F, h, w)). Text: umT5, 512 tokens. Text enters
by cross-attention, so every block's output is video tokens only, ordered (f, h, w).

Wan2.2 T2V-A14B has two experts, `transformer` (high noise, t >= boundary_ratio * 1000) and `transformer_2`
(low noise); a run trains one of them on its own timestep range. TI2V-5B (`expand_timesteps`) takes
per-token timesteps and a 16x spatial VAE with 48 latent channels.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tsa.models.base import (
    ModelFamily,
    SamplingDefaults,
    check_flow_sampling_options,
    flow_shift,
    is_flow_scheduler,
    model_index,
    shift_sigmas,
)

# Wan's own sample_neg_prompt (Wan-Video/Wan2.1 and Wan2.2 wan/configs/shared_config.py:19)
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
# Wan2.1 I2V-14B prepends "camera shake" (Wan-Video/Wan2.1 wan/configs/wan_i2v_14B.py:11)
WAN21_I2V_NEGATIVE_PROMPT = "镜头晃动，" + WAN_NEGATIVE_PROMPT

# Each variant's sampling recipe from Wan's own configs (docs/method.md, "Sampling defaults", cites the lines).
SAMPLING_DEFAULTS = {
    defaults.variant: defaults
    for defaults in (
        SamplingDefaults("wan2.1-t2v", 50, 5.0, 16, WAN_NEGATIVE_PROMPT, None, 5.0,
                         "Wan2.1 generate.py:71-77,244; wan/configs/shared_config.py:18-19"),
        SamplingDefaults("wan2.1-i2v-480p", 40, 5.0, 16, WAN21_I2V_NEGATIVE_PROMPT, None, 3.0,
                         "Wan2.1 generate.py:71-79,244; wan/configs/wan_i2v_14B.py:11; shared_config.py:18"),
        SamplingDefaults("wan2.1-i2v-720p", 40, 5.0, 16, WAN21_I2V_NEGATIVE_PROMPT, None, 5.0,
                         "Wan2.1 generate.py:71-77,244; wan/configs/wan_i2v_14B.py:11; shared_config.py:18"),
        SamplingDefaults("wan2.2-t2v-a14b", 40, 4.0, 16, WAN_NEGATIVE_PROMPT, 3.0, 12.0,
                         "Wan2.2 wan/configs/wan_t2v_A14B.py:34-37; shared_config.py:18-19"),
        SamplingDefaults("wan2.2-i2v-a14b", 40, 3.5, 16, WAN_NEGATIVE_PROMPT, 3.5, 5.0,
                         "Wan2.2 wan/configs/wan_i2v_A14B.py:34-37; shared_config.py:18-19"),
        SamplingDefaults("wan2.2-ti2v-5b", 50, 5.0, 24, WAN_NEGATIVE_PROMPT, None, 5.0,
                         "Wan2.2 wan/configs/wan_ti2v_5B.py:32-35; shared_config.py:19"),
    )
}


class WanFamily(ModelFamily):
    """Options: `timestep_sampling` ("logit-normal" or "uniform"), `logit_mean` / `logit_std`, `shift` (None: the
    scheduler's), `timestep_range` (see ModelFamily), `expand_timesteps` (TI2V-5B: per-token timesteps)."""

    name = "wan"
    pipeline_class_names = ("WanPipeline", "WanImageToVideoPipeline")
    image_pipeline_class_names = ("WanImageToVideoPipeline",)
    transformer_class_names = ("WanTransformer3DModel",)
    experts = ("transformer", "transformer_2")
    objective_options = {  # tsa-train options -> constructor keywords
        "timestep_sampling": "timestep_sampling", "logit_mean": "logit_mean", "logit_std": "logit_std",
        "flow_shift": "shift",
    }
    default_guidance_scale = 5.0
    default_fps = 16
    ffn_lora_target_modules = ("ffn.net.0.proj", "ffn.net.2")  # the FeedForward's two linear layers
    default_latents = "mean"  # Wan's own VAE encode returns the posterior mean (wan/modules/vae.py), as trainers use
    presets = {
        # M-TSA on Wan2.1 T2V-1.3B, full fine-tune, 81 x 480 x 832 (21 x 30 x 52 video tokens; block 18 of 30).
        "wan2.1-1.3b-mtsa": dict(
            model_family="wan",
            height=480,
            width=832,
            num_frames=81,
            align="mtsa",
            align_layer=18,
            align_weight=0.5,
            tau=0.1,
            top_k=0.2,
            finetune="full",
            learning_rate=2e-6,
            lr_warmup_steps=100,
            train_batch_size=2,
            max_steps=4000,
            checkpointing_steps=500,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            vae_tiling=True,
        ),
        # Wan2.1 T2V-14B with LoRA r128 / alpha 64, 81 x 720 x 1280 (21 x 45 x 80 tokens; block 24 of 40).
        "wan2.1-14b-lora": dict(
            model_family="wan",
            height=720,
            width=1280,
            num_frames=81,
            align="mtsa",
            align_layer=24,
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

    def __init__(
        self,
        timestep_range=None,
        *,
        timestep_sampling: str = "logit-normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float | None = None,
        expand_timesteps: bool = False,
        spatial_multiple: int = 16,
    ):
        super().__init__(timestep_range)
        check_flow_sampling_options(timestep_sampling, logit_std, shift)
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, float(logit_mean), float(logit_std)
        self.shift, self.expand_timesteps, self.spatial_multiple = shift, bool(expand_timesteps), spatial_multiple

    def __repr__(self) -> str:
        return (
            f"WanFamily(timestep_range={self.timestep_range}, timestep_sampling={self.timestep_sampling!r}, "
            f"logit_mean={self.logit_mean}, logit_std={self.logit_std}, shift={self.shift}, "
            f"expand_timesteps={self.expand_timesteps})"
        )

    @classmethod
    def from_model_path(cls, model_path, expert: str = "transformer", **options) -> WanFamily:
        """The family configured for a pipeline folder: expand_timesteps and the VAE x patch size multiple from
        its configs, and for a two-expert model (boundary_ratio) the chosen expert's timestep range."""
        import json

        index = model_index(model_path)
        if expert not in cls.experts:
            raise ValueError(f"expert must be one of {cls.experts}, got {expert!r}")
        boundary = index.get("boundary_ratio")
        if expert == "transformer_2" and (boundary is None or index.get("transformer_2", [None])[0] is None):
            raise ValueError(f"{model_path} has no second expert (transformer_2 with a boundary_ratio)")
        options = {key: value for key, value in options.items() if value is not None}
        if boundary is not None and options.get("timestep_range") is None:
            options["timestep_range"] = (boundary * 1000, 1000) if expert == "transformer" else (0, boundary * 1000)
        vae_config = Path(model_path) / "vae" / "config.json"
        if vae_config.is_file():
            spatial = json.loads(vae_config.read_text()).get("scale_factor_spatial") or 8
            options.setdefault("spatial_multiple", 2 * spatial)
        options.setdefault("expand_timesteps", bool(index.get("expand_timesteps", False)))
        family = cls._with_options(**options)
        family.image_to_video = cls.is_image_to_video(model_path)
        return family

    # ------------------------------------------------------------------------------------------- sampling
    @staticmethod
    def variant(model_path, height: int | None = None, width: int | None = None) -> str:
        """The Wan variant of a pipeline folder (a key of SAMPLING_DEFAULTS), from model_index.json: a
        boundary_ratio is Wan2.2 A14B, expand_timesteps TI2V-5B, else Wan2.1 (T2V-1.3B and T2V-14B share their
        recipe; I2V-14B's shift depends on the size, 480p up to 832 x 480 pixels as generate.py's "832*480")."""
        index = model_index(model_path)
        image = index.get("_class_name") == "WanImageToVideoPipeline"
        if index.get("boundary_ratio") is not None:
            return "wan2.2-i2v-a14b" if image else "wan2.2-t2v-a14b"
        if index.get("expand_timesteps"):
            return "wan2.2-ti2v-5b"
        if image:
            return "wan2.1-i2v-480p" if (height or 480) * (width or 832) <= 480 * 832 else "wan2.1-i2v-720p"
        return "wan2.1-t2v"

    def sampling_defaults(self, model_path, height=None, width=None) -> SamplingDefaults:
        """Wan's own recipe for the variant in `model_path` (see SAMPLING_DEFAULTS and `variant`)."""
        return SAMPLING_DEFAULTS[self.variant(model_path, height, width)]

    # ------------------------------------------------------------------------------------------- loading
    def transformer_class(self):
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def pipeline_class(self):
        from diffusers import WanPipeline

        return WanPipeline

    def load_encoders(self, model_path, device="cpu", dtype=torch.float32, tiling=False):
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        vae = AutoencoderKLWan.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype).to(device).eval()
        if tiling:
            vae.enable_tiling()
        if self.is_image_to_video(model_path):  # with Wan2.1 I2V's CLIP image encoder where the folder has one
            image = {"image_encoder": None, "image_processor": None}
            if model_index(model_path).get("image_encoder", [None])[0] is not None:
                from transformers import CLIPImageProcessor, CLIPVisionModel

                image = {"image_encoder": CLIPVisionModel.from_pretrained(
                             model_path, subfolder="image_encoder", torch_dtype=dtype).to(device).eval(),
                         "image_processor": CLIPImageProcessor.from_pretrained(model_path, subfolder="image_processor")}
            return WanImageToVideoPipeline(
                tokenizer=AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer"),
                text_encoder=UMT5EncoderModel.from_pretrained(
                    model_path, subfolder="text_encoder", torch_dtype=dtype).to(device),
                vae=vae, transformer=None, scheduler=None, **image,
            )
        return WanPipeline(
            tokenizer=AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(model_path, subfolder="text_encoder", torch_dtype=dtype).to(
                device
            ),
            vae=vae,
            transformer=None,
            scheduler=None,
        )

    def max_sequence_length(self, model_path) -> int:
        return 512  # WanPipeline.__call__'s default

    def normalize_latents(self, latents, vae_config):
        latents = latents.float()
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae_config["latents_mean"], dtype=torch.float32, device=latents.device).view(shape)
        std = torch.tensor(vae_config["latents_std"], dtype=torch.float32, device=latents.device).view(shape)
        return ((latents - mean) / std).permute(0, 2, 1, 3, 4)

    def vae_compression(self, vae_config):
        return vae_config.get("scale_factor_temporal") or 4, vae_config.get("scale_factor_spatial") or 8

    # ------------------------------------------------------------------------------------------- structure
    def blocks(self, transformer):
        return self.unwrap(transformer).blocks

    def token_grid(self, config, latent_shape):
        _, frames, _, height, width = latent_shape
        patch_t, patch_h, patch_w = config.patch_size
        return frames // patch_t, height // patch_h, width // patch_w

    def transformer_input_grid(self, config, hidden_states_shape, call_kwargs=None):
        batch, channels, frames, height, width = hidden_states_shape
        return self.token_grid(config, (batch, frames, channels, height, width))

    def text_dim(self, config) -> int:
        return config.text_dim

    def check_latents(self, config, latents):
        patch_t, patch_h, patch_w = config.patch_size
        if latents.shape[1] % patch_t or latents.shape[3] % patch_h or latents.shape[4] % patch_w:
            raise ValueError(
                f"latents (B, F, C, h, w) = {tuple(latents.shape)} must divide by the patch size "
                f"{tuple(config.patch_size)} (F, h, w)"
            )
        if latents.shape[2] != config.out_channels:
            raise ValueError(f"latents have {latents.shape[2]} channels, the transformer takes {config.out_channels}")

    # ------------------------------------------------------------------------------------------- objective
    def check_scheduler(self, scheduler):
        if scheduler is None:
            raise ValueError(
                "a noise scheduler is required: pass the model's own (WanFamily().load_scheduler("
                "model_path)), its shift sets the training timesteps"
            )
        prediction = scheduler.config.get("prediction_type")
        if not is_flow_scheduler(scheduler):
            raise ValueError(
                f"Wan trains with rectified flow: pass a flow-matching scheduler "
                f"(FlowMatchEulerDiscreteScheduler, or UniPC with use_flow_sigmas), got "
                f"{type(scheduler).__name__}"
            )
        if prediction not in (None, "flow_prediction"):
            raise ValueError(f"Wan needs a flow-prediction scheduler, got prediction_type={prediction!r}")
        if self.shift is None:
            flow_shift(scheduler)  # raises for schedulers without one

    def sigma_shift(self, scheduler) -> float:
        return self.shift if self.shift is not None else flow_shift(scheduler)

    def sample_timesteps(self, scheduler, batch_size, device, generator=None):
        """(B,) float timesteps t = 1000 sigma, sigma = shift(u), u logit-normal or uniform, inside
        `timestep_range` (the truncated distribution, sampled exactly through its inverse CDF)."""
        shift = self.sigma_shift(scheduler)
        steps = float(scheduler.config.num_train_timesteps)
        low, high = self.timestep_range or (0.0, steps)

        def unshift(sigma):  # inverse of shift_sigmas
            return sigma / (shift - (shift - 1) * sigma)

        u_low, u_high = unshift(low / steps), unshift(high / steps)
        gen_device = generator.device if generator is not None else device
        p = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
        if self.timestep_sampling == "uniform":
            u = u_low + (u_high - u_low) * p
        else:

            def cdf(value):  # normal CDF of the logit of u
                if value <= 0 or value >= 1:
                    return 0.0 if value <= 0 else 1.0
                return 0.5 * (
                    1 + math.erf((math.log(value / (1 - value)) - self.logit_mean) / (self.logit_std * math.sqrt(2)))
                )

            lo, hi = cdf(u_low), cdf(u_high)
            q = (lo + (hi - lo) * p).clamp(1e-12, 1 - 1e-12)
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(q))
        sigma = shift_sigmas(u, shift).clamp(low / steps, high / steps * (1 - 1e-6))  # t in [low, high)
        return (sigma * steps).float().to(device)

    def transformer_timesteps(self, timesteps, transformer, grid) -> torch.Tensor:
        """(B,) timesteps as the transformer takes them: (B, tokens) per-token copies with expand_timesteps."""
        if not self.expand_timesteps:
            return timesteps
        return timesteps[:, None].expand(-1, math.prod(grid))

    # ------------------------------------------------------------------------------------------- image-to-video
    @classmethod
    def tasks(cls, model_path):
        """TI2V-5B (expand_timesteps in a WanPipeline folder) does both: text-to-video by default."""
        if model_index(model_path).get("expand_timesteps") and not cls.is_image_to_video(model_path):
            return ("t2v", "i2v")
        return super().tasks(model_path)

    def encode_image_condition(self, encoders, video):
        """As WanImageToVideoPipeline.prepare_latents: the VAE mode (z, F, h, w) of the clip's first frame followed
        by zero frames ("condition_latents", normalised at training time), and with Wan2.1 I2V's CLIP encoder the
        penultimate hidden states of the first frame ("image_embeds", encode_image)."""
        frames = video.shape[2]
        first = video[:, :, :1]
        video_condition = first if self.expand_timesteps else torch.cat(
            [first, first.new_zeros(*first.shape[:2], frames - 1, *first.shape[3:])], dim=2)
        entry = {"condition_latents": encoders.vae.encode(video_condition).latent_dist.mode()[0].contiguous().cpu()}
        if getattr(encoders, "image_encoder", None) is not None:
            from PIL import Image

            pixels = ((first[0, :, 0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
            entry["image_embeds"] = encoders.encode_image(image, video.device)[0].contiguous().cpu()
        return entry

    def image_condition(self, batch, vae_config, latents):
        """`condition` (B, 4 + z, F, h, w): the first-frame mask (1 on the first latent frame's 4 pixel frames)
        and the normalised condition latents, and `image_embeds` where cached, as WanImageToVideoPipeline
        builds them (prepare_latents, encode_image)."""
        if not self.image_to_video:
            return {}
        temporal = vae_config.get("scale_factor_temporal") or 4
        batch_size, latent_frames, _, height, width = latents.shape
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae_config["latents_mean"]).view(shape).to(latents.device, torch.float32)
        inverse_std = 1.0 / torch.tensor(vae_config["latents_std"]).view(shape).to(latents.device, torch.float32)
        condition_latents = (batch["condition_latents"].to(latents.device).float() - mean) * inverse_std
        if self.expand_timesteps:  # TI2V-5B: the first latent frame is the image's, at timestep 0
            return {"first_frame_latents": condition_latents.to(latents.dtype)}
        num_frames = (latent_frames - 1) * temporal + 1
        mask = torch.ones(batch_size, 1, num_frames, height, width, device=latents.device)
        mask[:, :, 1:] = 0
        mask = torch.cat([torch.repeat_interleave(mask[:, :, :1], temporal, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(batch_size, -1, temporal, height, width).transpose(1, 2)
        condition = {"condition": torch.cat([mask, condition_latents], dim=1).to(latents.dtype)}
        if "image_embeds" in batch:
            condition["image_embeds"] = batch["image_embeds"].to(latents.device, latents.dtype)
        return condition

    def denoise_and_loss(
        self, transformer, scheduler, latents, prompt_embeds, *, timesteps=None, noise=None, generator=None,
        condition=None, image_embeds=None, first_frame_latents=None,
    ):
        """x_t = (1 - sigma) x0 + sigma eps; v_hat = transformer(x_t, prompt, t); x0_hat = x_t - sigma v_hat.
        Image-to-video (see image_condition): `condition` (B, 4 + z, F, h, w) joins x_t on the channel axis and
        `image_embeds` enter as encoder_hidden_states_image, as WanImageToVideoPipeline's transformer call.
        TI2V-5B: `first_frame_latents` (B, z, 1, h, w) replace x_t's first latent frame, whose tokens get
        timestep 0 (the pipeline's first_frame_mask), and the loss leaves that frame out (DiffSynth-Studio's
        FlowMatchSFTLoss)."""
        self.check_scheduler(scheduler)
        batch = latents.shape[0]
        if timesteps is None:
            timesteps = self.sample_timesteps(scheduler, batch, latents.device, generator)
        timesteps = timesteps.to(device=latents.device, dtype=torch.float32)
        if noise is None:
            gen_device = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noise = noise.to(latents)
        sigma = (timesteps / scheduler.config.num_train_timesteps).view(batch, 1, 1, 1, 1)
        noisy_latents = ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
        module = self.unwrap(transformer)
        grid = self.token_grid(module.config, tuple(latents.shape))
        model_input, extra = noisy_latents.permute(0, 2, 1, 3, 4), {}
        transformer_timesteps = self.transformer_timesteps(timesteps, module, grid)
        if first_frame_latents is not None:
            mask = torch.ones_like(model_input[:1, :1])
            mask[:, :, 0] = 0
            model_input = (1 - mask) * first_frame_latents.to(model_input) + mask * model_input
            _, patch_h, patch_w = module.config.patch_size
            token_mask = mask[0, 0][:, ::patch_h, ::patch_w].flatten()
            transformer_timesteps = transformer_timesteps * token_mask.to(transformer_timesteps)
        if condition is not None:
            model_input = torch.cat([model_input, condition.to(model_input)], dim=1)
        if image_embeds is not None:
            extra["encoder_hidden_states_image"] = image_embeds
        velocity = transformer(
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=transformer_timesteps,
            return_dict=False,
            **extra,
        )[0].permute(0, 2, 1, 3, 4)
        target = noise.float() - latents.float()
        first = 1 if first_frame_latents is not None else 0  # TI2V: the given first frame is not learned
        loss = (velocity.float() - target)[:, first:].pow(2).flatten(1).mean(1).mean()
        x0_pred = noisy_latents.float() - sigma * velocity.float()
        return {
            "loss": loss,
            "x0_pred": x0_pred.to(latents.dtype),
            "timesteps": timesteps,
            "noisy_latents": noisy_latents,
        }

    def x0_from_output(self, scheduler, model_output, sample, timestep, transformer_kwargs=None):
        """x0 = x_t - sigma v. With per-token timesteps (TI2V-5B's expand_timesteps: the first latent frame is the
        image's, at timestep 0) a frame whose tokens are all at timestep 0 is clean: its x0 is the transformer's
        input there (the condition), not the scheduler's sample, whose copy of that frame the pipeline discards."""
        index = int((scheduler.timesteps.to(sample.device) - timestep).abs().argmin())
        sigma = scheduler.sigmas[index].to(device=sample.device, dtype=torch.float32)
        x0 = sample.float() - sigma * model_output  # (B, C, F, h, w)
        kwargs = transformer_kwargs or {}
        token_timesteps, hidden = kwargs.get("timestep"), kwargs.get("hidden_states")
        if token_timesteps is not None and token_timesteps.ndim == 2 and hidden is not None and (
                hidden.shape == sample.shape):
            frames = sample.shape[2]
            clean = (token_timesteps.reshape(sample.shape[0], frames, -1) == 0).all(-1)  # (B, F)
            x0 = torch.where(clean[:, None, :, None, None], hidden.float(), x0)
        return x0.permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------------------------------- weights
    def load_lora_into(self, pipe, run_dir, expert="transformer"):
        pipe.load_lora_weights(run_dir, load_into_transformer_2=expert == "transformer_2")

    # ------------------------------------------------------------------------------------------- tiny models
    def tiny_pipeline_class(self, i2v: bool = False, **options):
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline if i2v else self.pipeline_class()

    def tiny_components(
        self, num_layers: int = 2, seed: int = 0, two_experts: bool = False, ti2v: bool = False, i2v: bool = False
    ) -> dict:
        """The components of a WanPipeline, tiny and random: Wan2.1 by default, Wan2.2 A14B-style with
        `two_experts` (transformer + transformer_2, boundary_ratio 0.875), TI2V-5B-style with `ti2v`
        (expand_timesteps, a residual VAE with 16x spatial compression); `i2v`: WanImageToVideoPipeline's, Wan2.1
        I2V-style (a CLIP image encoder, mask and condition channels in) or with `two_experts` Wan2.2 I2V-A14B-style
        (no image encoder, boundary_ratio 0.9)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from tsa.models.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        channels = 6 if ti2v else 4
        components = {
            "tokenizer": tokenizer,
            "text_encoder": tiny_umt5(len(tokenizer), seed=seed),
            "vae": tiny_wan_vae(channels, residual=ti2v, seed=seed),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
            "transformer": tiny_wan_transformer(num_layers, channels, seed=seed),
        }
        if i2v:
            image_dim = None if two_experts else TINY_CLIP_DIM
            components["transformer"] = tiny_wan_transformer(num_layers, channels, seed=seed, image_dim=image_dim,
                                                             image_to_video=True)
            components.update(tiny_clip(seed) if image_dim else {"image_encoder": None, "image_processor": None})
        if two_experts:
            components.update(
                transformer_2=tiny_wan_transformer(num_layers, channels, seed=seed + 1, image_to_video=i2v),
                boundary_ratio=0.9 if i2v else 0.875,
            )
        if ti2v:
            components["expand_timesteps"] = True
        return components


TINY_CLIP_DIM = 16  # hidden size of the tiny CLIP image encoder


def tiny_clip(seed: int = 0) -> dict:
    """A 2-layer CLIPVisionModel (32 x 32 images, patch 8) and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=TINY_CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"image_encoder": CLIPVisionModel(config).eval(), "image_processor": processor}


def tiny_wan_transformer(num_layers: int = 2, latent_channels: int = 4, seed: int = 0, image_dim=None,
                         image_to_video: bool | None = None):
    """WanTransformer3DModel: 2 heads x 16 dims, patch (1, 2, 2), text width TINY_TEXT_DIM; `image_dim` (Wan2.1
    I2V) adds the CLIP image cross-attention; image-to-video models (image_dim, or `image_to_video`) take the 4
    mask and `latent_channels` condition channels besides the noisy latents."""
    from diffusers import WanTransformer3DModel

    from tsa.models.tiny import TINY_TEXT_DIM

    torch.manual_seed(seed)
    image_to_video = image_dim is not None if image_to_video is None else image_to_video
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=2 * latent_channels + 4 if image_to_video else latent_channels,
        out_channels=latent_channels,
        image_dim=image_dim,
        added_kv_proj_dim=32 if image_dim is not None else None,
        text_dim=TINY_TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=64,
    )


def tiny_wan_vae(latent_channels: int = 4, residual: bool = False, seed: int = 0):
    """AutoencoderKLWan with the real 4x temporal compression, 8x spatial (16x with `residual`, the TI2V-5B
    layout), 8-channel blocks and non-trivial latents_mean / latents_std."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mean = (torch.randn(latent_channels, generator=generator) * 0.5).tolist()
    std = (torch.rand(latent_channels, generator=generator) * 1.5 + 0.5).tolist()
    options = (
        dict(is_residual=True, patch_size=2, scale_factor_spatial=16, in_channels=12, out_channels=12)
        if residual
        else {}
    )
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=mean,
        latents_std=std,
        **options,
    ).eval()


def tiny_umt5(vocab_size: int, seed: int = 0):
    """A 2-layer UMT5 encoder with d_model = TINY_TEXT_DIM."""
    from transformers import UMT5Config, UMT5EncoderModel

    from tsa.models.tiny import TINY_TEXT_DIM

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()
