"""LTX-2 (diffusers LTX2Pipeline / LTX2VideoTransformer3DModel / AutoencoderKLLTX2Video / Gemma 3 + LTX2TextConnectors).

LTX-2 is an audio-video DiT: every block updates a video stream and an audio stream. tsa trains it on video-only
clips the way Lightricks' ltx-trainer does when a run has no audio modality: the audio stream holds one zero
placeholder token and the audio-to-video / video-to-audio cross-attention is off (`isolate_modalities=True`), so
each block's video tokens
depend only on the video, the text and the timestep. Audio tokens are never aligned.

Objective (ltx-trainer `training_strategies/flexible.py`, diffusers `pipeline_ltx2.py`): rectified flow on the
packed video tokens, x_t = (1 - sigma) x0 + sigma eps, the model predicts v ~ eps - x0, the loss is the per-clip
mean of (v_hat - (eps - x0))^2 over the tokens that are not conditioning tokens, then the batch mean;
x0_hat = x_t - sigma v_hat. Training sigmas: ltx-trainer's stretched shifted logit-normal (mu from the video token
count, as the pipeline's `calculate_shift` with the scheduler's base/max shift; 10% uniform), or uniform. The
transformer takes t = 1000 sigma (the pipeline's scheduler timesteps); optional first-frame conditioning gives
per-token timesteps (0 on the clean first latent frame).

Latents: the VAE posterior mean (ltx-core's encoder returns the means), normalised per channel as the pipeline does,
(z - latents_mean) * scaling_factor / latents_std, with latents_mean / latents_std the VAE's buffers (its weights,
not its config). Layout outside the family (B, F, C, h, w); the transformer takes packed (B, F*h*w / p^2, C p^2).
Text: Gemma 3 hidden states of every layer (1024 tokens, left padded) through the pipeline's frozen connectors; the
connectors' video output (B, L, D) is cached (the DiT's text mask is its non-zero rows: the connectors multiply
their output by it) with, for LaMo's pooling, the real-token positions in the connectors' order.

docs/method.md ("LTX-2") cites the file and line behind each choice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tsa.models.base import (
    ModelFamily,
    SamplingDefaults,
    check_flow_sampling_options,
    is_flow_scheduler,
    model_index,
)

# ltx-trainer timestep_samplers.py: the standard-normal percentiles the stretched logit-normal maps to [0, 1].
NORMAL_999_PERCENTILE = 3.0902
NORMAL_005_PERCENTILE = -2.5758
# Video-only LoRA targets of ltx-trainer's configuration reference (video self- and text cross-attention).
VIDEO_ATTENTION_TARGETS = tuple(
    f"{attention}.{projection}"
    for attention in ("attn1", "attn2")
    for projection in ("to_k", "to_q", "to_v", "to_out.0")
)
# Lightricks/LTX-2 packages/ltx-pipelines/src/ltx_pipelines/utils/constants.py:186-199 (DEFAULT_NEGATIVE_PROMPT).
LTX2_NEGATIVE_PROMPT = (
    "has_subtitles, has_blurbox, transition from black, transition to black, speech_ending_short, "
    "blurry, out of focus, overexposed, underexposed, low contrast, washed out colors, excessive noise, "
    "grainy texture, poor lighting, flickering, motion blur, distorted proportions, unnatural skin tones, "
    "deformed facial features, asymmetrical face, missing facial features, extra limbs, disfigured hands, "
    "wrong hand count, artifacts around text, inconsistent perspective, camera shake, incorrect depth of "
    "field, background too sharp, background clutter, distracting reflections, harsh shadows, inconsistent "
    "lighting direction, color banding, cartoonish rendering, 3D CGI look, unrealistic materials, uncanny "
    "valley effect, incorrect ethnicity, wrong gender, exaggerated expressions, wrong gaze direction, "
    "mismatched lip sync, silent or muted audio, distorted voice, robotic voice, echo, background noise, "
    "off-sync audio, incorrect dialogue, added dialogue, repetitive speech, jittery movement, awkward "
    "pauses, incorrect timing, unnatural transitions, inconsistent framing, tilted camera, flat lighting, "
    "inconsistent tone, cinematic oversaturation, stylized filters, or AI artifacts."
)
# ltx-pipelines' PipelineParams (constants.py:40-68): 40 steps, video CFG 3.0, 24 fps; the shift is the scheduler's
# own, resolution-dependent one (no fixed flow shift).
SAMPLING_DEFAULTS = SamplingDefaults(
    "ltx2", 40, 3.0, 24, LTX2_NEGATIVE_PROMPT, None, None,
    "Lightricks/LTX-2 packages/ltx-pipelines/src/ltx_pipelines/utils/constants.py:40-68,186-199",
)
PIPELINE_SIZE_MULTIPLE = 32  # LTX2Pipeline.check_inputs refuses other heights and widths, whatever the VAE
GEMMA_MAX_SEQUENCE_LENGTH = 1024  # LTX2Pipeline.__call__'s default; ltx-core gemma_assets.TOKENIZER_MAX_LENGTH

# ltx-trainer's configs/t2v_lora.yaml (LoRA, optimiser, schedule) on its 960x544x49 bucket, with M-TSA.
MTSA_LORA_RECIPE = dict(
    height=544,
    width=960,
    num_frames=49,
    align="mtsa",
    align_layer=29,
    align_weight=0.5,
    tau=0.1,
    top_k=0.2,
    finetune="lora",
    lora_rank=32,
    lora_alpha=32,
    learning_rate=1e-4,
    lr_scheduler="linear",
    lr_warmup_steps=0,
    max_grad_norm=1.0,
    train_batch_size=1,
    max_steps=2000,
    checkpointing_steps=250,
    mixed_precision="bf16",
    gradient_checkpointing=True,
    vae_tiling=True,
)


def pack_latents(latents: torch.Tensor, patch_size: int = 1, patch_size_t: int = 1) -> torch.Tensor:
    """(B, F, C, h, w) latents -> the transformer's packed tokens (B, F/pt * h/p * w/p, C pt p p), frame-major."""
    from diffusers import LTX2Pipeline

    return LTX2Pipeline._pack_latents(latents.permute(0, 2, 1, 3, 4), patch_size, patch_size_t)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: int = 1, patch_size_t: int = 1):
    """Packed tokens (B, N, C pt p p) on the token grid (F, H, W) -> latents (B, F pt, C, H p, W p)."""
    from diffusers import LTX2Pipeline

    return LTX2Pipeline._unpack_latents(tokens, *grid, patch_size, patch_size_t).permute(0, 2, 1, 3, 4)


def stretched_logit_normal(u_normal: torch.Tensor, mu: float, std: float, eps: float = 1e-3) -> torch.Tensor:
    """ltx-trainer's ShiftedLogitNormalTimestepSampler without its uniform fallback: sigmoid(mu + std n) stretched so
    that its 0.5th..99.9th percentiles span [0, 1], reflected about eps near 0 and clamped to [0, 1]."""
    logit_normal = torch.sigmoid(u_normal * std + mu)
    high = 1 / (1 + math.exp(-(mu + NORMAL_999_PERCENTILE * std)))
    low = 1 / (1 + math.exp(-(mu + NORMAL_005_PERCENTILE * std)))
    stretched = (logit_normal - low) / (high - low)
    return torch.where(stretched >= eps, stretched, 2 * eps - stretched).clamp(0, 1)


class LTX2Family(ModelFamily):
    """Options: `timestep_sampling` ("logit-normal": ltx-trainer's stretched shifted logit-normal, or "uniform"),
    `logit_mean` (added to the token-count shift mu), `logit_std`, `shift` (a fixed shift exp(mu) instead of the
    token-count one), `uniform_prob` (the share of uniform sigmas mixed into the logit-normal ones),
    `first_frame_conditioning_p` (the chance a clip trains image-to-video: its first latent frame clean, timestep 0,
    no loss), `fps` (the clip frame rate the video positions use), `timestep_range` (see ModelFamily)."""

    name = "ltx2"
    pipeline_class_names = ("LTX2Pipeline",)
    transformer_class_names = ("LTX2VideoTransformer3DModel",)
    default_lora_target_modules = VIDEO_ATTENTION_TARGETS
    ffn_lora_target_modules = ("ff.net.0.proj", "ff.net.2")  # the video feed-forward (not audio_ff)
    default_latents = "mean"  # ltx-core's VideoEncoder returns the posterior mean (video_vae.py:334-336)
    prediction_type = "flow"
    temporal_compression = 8
    spatial_multiple = 32
    default_guidance_scale = 3.0  # LTX2Pipeline.__call__'s default
    default_fps = 24  # LTX2Pipeline.__call__'s frame_rate; ltx-trainer DEFAULT_FPS
    objective_options = {  # tsa-train options -> constructor keywords
        "timestep_sampling": "timestep_sampling", "logit_mean": "logit_mean", "logit_std": "logit_std",
        "flow_shift": "shift",
    }
    tiny_preset = {"width": 128}  # the tiny preset's 144 is no multiple of 32, which LTX2Pipeline requires
    presets = {
        # M-TSA on LTX-2 (19B) with ltx-trainer's t2v LoRA recipe (r32 / a32, lr 1e-4, 2000 steps, batch 1, clip 1.0)
        # on its resolution bucket 960x544x49 (7 x 17 x 30 video tokens); block 29 of 48 (about 60% depth).
        "ltx2-19b-mtsa-lora": MTSA_LORA_RECIPE,
        # LTX-2.3 (22B; gated attention, per-modality text projections, 48 blocks): the same recipe and block.
        "ltx2.3-22b-mtsa-lora": MTSA_LORA_RECIPE,
    }

    def __init__(
        self,
        timestep_range=None,
        *,
        timestep_sampling: str = "logit-normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float | None = None,
        uniform_prob: float = 0.1,
        first_frame_conditioning_p: float = 0.0,
        fps: float = 24.0,
        temporal_compression: int = 8,
        spatial_multiple: int = 32,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__(timestep_range)
        check_flow_sampling_options(timestep_sampling, logit_std, shift)
        probabilities = {"uniform_prob": uniform_prob, "first_frame_conditioning_p": first_frame_conditioning_p}
        for option, value in probabilities.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{option} must be in [0, 1], got {value}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if (latents_mean is None) != (latents_std is None):
            raise ValueError("latents_mean and latents_std go together")
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, float(logit_mean), float(logit_std)
        self.shift, self.uniform_prob = shift, float(uniform_prob)
        self.first_frame_conditioning_p, self.fps = float(first_frame_conditioning_p), float(fps)
        self.temporal_compression, self.spatial_multiple = int(temporal_compression), int(spatial_multiple)
        self.latents_mean, self.latents_std = latents_mean, latents_std

    def __repr__(self) -> str:
        return (
            f"LTX2Family(timestep_range={self.timestep_range}, timestep_sampling={self.timestep_sampling!r}, "
            f"logit_mean={self.logit_mean}, logit_std={self.logit_std}, shift={self.shift}, "
            f"uniform_prob={self.uniform_prob}, first_frame_conditioning_p={self.first_frame_conditioning_p}, "
            f"fps={self.fps})"
        )

    @classmethod
    def from_model_path(cls, model_path, expert: str = "transformer", **options) -> LTX2Family:
        """The family configured for a pipeline folder: the VAE's compression and its latent statistics (buffers of
        its weights, which the latent normalisation needs)."""
        if expert not in cls.experts:
            raise ValueError(f"{cls.name} pipelines have the denoisers {cls.experts}, got expert={expert!r}")
        options = {key: value for key, value in options.items() if value is not None}
        vae_dir = Path(model_path) / "vae"
        if (vae_dir / "config.json").is_file():
            temporal, spatial = cls().vae_compression(json.loads((vae_dir / "config.json").read_text()))
            transformer_config = Path(model_path) / expert / "config.json"
            patch = 1
            if transformer_config.is_file():
                patch = json.loads(transformer_config.read_text()).get("patch_size", 1)
            options.setdefault("temporal_compression", temporal)
            options.setdefault("spatial_multiple", math.lcm(PIPELINE_SIZE_MULTIPLE, spatial * patch))
            if not {"latents_mean", "latents_std"} & set(options):
                mean, std = vae_latent_statistics(vae_dir)
                options.update(latents_mean=mean, latents_std=std)
        return cls._with_options(**options)

    # ------------------------------------------------------------------------------------------- loading
    def transformer_class(self):
        from diffusers import LTX2VideoTransformer3DModel

        return LTX2VideoTransformer3DModel

    def pipeline_class(self):
        from diffusers import LTX2Pipeline

        return LTX2Pipeline

    def load_encoders(self, model_path, device="cpu", dtype=torch.float32, tiling=False):
        """An LTX2Pipeline holding the video VAE, the tokenizer, the Gemma text encoder and the text connectors."""
        import transformers
        from diffusers import AutoencoderKLLTX2Video, LTX2Pipeline
        from diffusers.pipelines.ltx2 import LTX2TextConnectors

        index = model_index(model_path)
        text_encoder_class = getattr(transformers, index.get("text_encoder", [None, "AutoModel"])[1])
        vae = AutoencoderKLLTX2Video.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype).to(device).eval()
        if tiling:
            vae.enable_tiling()
        return LTX2Pipeline(
            scheduler=None,
            vae=vae,
            audio_vae=None,
            text_encoder=text_encoder_class.from_pretrained(model_path, subfolder="text_encoder", torch_dtype=dtype)
            .to(device)
            .eval(),
            tokenizer=transformers.AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer"),
            connectors=LTX2TextConnectors.from_pretrained(model_path, subfolder="connectors", torch_dtype=dtype)
            .to(device)
            .eval(),
            transformer=None,
            vocoder=None,
        )

    def max_sequence_length(self, model_path) -> int:
        return GEMMA_MAX_SEQUENCE_LENGTH

    def sampling_defaults(self, model_path, height=None, width=None) -> SamplingDefaults:
        return SAMPLING_DEFAULTS

    @torch.no_grad()
    def encode_prompts(self, pipe, captions, max_sequence_length=GEMMA_MAX_SEQUENCE_LENGTH, device=None, dtype=None):
        """Captions -> what the transformer's text cross-attention takes, as LTX2Pipeline.__call__ builds it:
        {"prompt_embeds" (B, L, D): the connectors' video output, "prompt_attention_mask" (B, L): its mask,
        "prompt_mask" (B, L) bool: the positions holding real tokens in the connector's order (LaMo pools them)}."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        device = device or pipe._execution_device
        embeds, mask, _, _ = pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device,
            dtype=dtype,
        )
        padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        video, _, connector_mask = pipe.connectors(embeds, mask, padding_side=padding_side)
        return {"prompt_embeds": video, "prompt_attention_mask": connector_mask.bool(),
                "prompt_mask": self._real_tokens(pipe, mask)}

    @torch.no_grad()
    def encode_entry(self, pipe, pixels: torch.Tensor, caption: str, max_sequence_length=GEMMA_MAX_SEQUENCE_LENGTH):
        """One cache entry: pixels (T, 3, H, W) in [-1, 1] -> {"latent_dist" (2C, F, h, w), "prompt_embeds" (L, D):
        the connectors' video output, "prompt_mask" (L,): its real tokens}. The connectors' attention mask is not
        stored: the pipeline multiplies the embeddings by it, so it is their non-zero rows."""
        device, dtype = pipe.vae.device, pipe.vae.dtype
        video = pixels.to(device, dtype).permute(1, 0, 2, 3).unsqueeze(0)
        latent_dist = pipe.vae.encode(video).latent_dist.parameters[0]
        prompt = self.encode_prompts(pipe, [caption], max_sequence_length, device=device, dtype=dtype)
        return {
            "latent_dist": latent_dist.contiguous().cpu(),
            "prompt_embeds": prompt["prompt_embeds"][0].contiguous().cpu(),
            "prompt_mask": prompt["prompt_mask"][0].contiguous().cpu(),
        }

    # ------------------------------------------------------------------------------------------- latents
    def normalize_latents(self, latents, vae_config):
        """(z - latents_mean) * scaling_factor / latents_std per channel (LTX2Pipeline._normalize_latents), with the
        statistics from `vae_config` (keys latents_mean / latents_std) or from the folder this family was built on."""
        mean = vae_config.get("latents_mean", self.latents_mean)
        std = vae_config.get("latents_std", self.latents_std)
        if mean is None or std is None:
            raise ValueError(
                "LTX-2 latents are normalised with the VAE's latents_mean / latents_std buffers: build the family "
                "with LTX2Family.from_model_path(model_path) (or pass them in vae_config)"
            )
        shape = (1, -1, 1, 1, 1)
        latents = latents.float()
        mean = torch.as_tensor(mean, dtype=torch.float32, device=latents.device).view(shape)
        std = torch.as_tensor(std, dtype=torch.float32, device=latents.device).view(shape)
        scaling = float(vae_config.get("scaling_factor", 1.0))
        return ((latents - mean) * scaling / std).permute(0, 2, 1, 3, 4)

    def vae_compression(self, vae_config):
        """(temporal, spatial) as AutoencoderKLLTX2Video computes them: the config's ratios, else patch x 2^(scaled
        blocks)."""
        scaling = vae_config.get("spatio_temporal_scaling", (True, True, True, True))
        if isinstance(scaling, bool):
            scaling = (scaling,) * (len(vae_config.get("layers_per_block", (4, 6, 6, 2, 2))) - 1)
        factor = 2 ** sum(bool(value) for value in scaling)
        temporal = vae_config.get("temporal_compression_ratio") or vae_config.get("patch_size_t", 1) * factor
        spatial = vae_config.get("spatial_compression_ratio") or vae_config.get("patch_size", 4) * factor
        return int(temporal), int(spatial)

    # ------------------------------------------------------------------------------------------- structure
    def blocks(self, transformer):
        return self.unwrap(transformer).transformer_blocks

    def token_grid(self, config, latent_shape):
        _, frames, _, height, width = latent_shape
        patch, patch_t = config.patch_size, config.patch_size_t
        return frames // patch_t, height // patch, width // patch

    def transformer_input_grid(self, config, hidden_states_shape, call_kwargs=None):
        """(F, H, W) of a transformer call: the hidden states are packed tokens (B, N, C), so the grid comes from the
        call's num_frames / height / width (already in tokens, patch size 1, as LTX2Pipeline passes them)."""
        call_kwargs = call_kwargs or {}
        if not all(call_kwargs.get(key) is not None for key in ("num_frames", "height", "width")):
            raise ValueError(
                "an LTX-2 transformer call carries packed tokens: its token grid comes from num_frames, height and "
                "width, which this call does not pass"
            )
        grid = tuple(int(call_kwargs[key]) for key in ("num_frames", "height", "width"))
        if math.prod(grid) != hidden_states_shape[1]:
            raise ValueError(f"{hidden_states_shape[1]} video tokens do not fill the grid {grid}")
        return grid

    def context_parallel_plan(self, config=None):
        """diffusers' LTX2VideoTransformer3DModel plan for the video stream: the video tokens and their rotary tables
        split over the ranks, the output gathered. The prompt tokens stay whole on every rank (the class's plan
        also splits them, but diffusers' Ulysses backward assumes as many key as query tokens, so the text
        cross-attention runs locally, see enable_context_parallel). For `config.rope_type` "split" the rotary
        tables are (B, heads, N, D / 2) and split along N; the class's plan expects the interleaved (B, N, D)."""
        from diffusers.models._modeling_parallel import ContextParallelInput

        class_plan = self.transformer_class()._cp_plan
        plan = {"": {"hidden_states": class_plan[""]["hidden_states"]}, "rope": class_plan["rope"],
                "proj_out": class_plan["proj_out"]}
        if config is not None and config.get("rope_type") == "split":
            table = ContextParallelInput(split_dim=2, expected_dims=4, split_output=True)
            plan["rope"] = {0: table, 1: table}
        return plan

    def enable_context_parallel(self, transformer, config) -> None:
        """The plan above, with Ulysses attention for the video self-attention only: every other attention (text
        cross-attention, the audio stream, which is not split) takes its keys whole on each rank, so it runs on
        the rank's own queries without communication."""
        super().enable_context_parallel(transformer, config)
        for block in transformer.transformer_blocks:
            for name, attention in block.named_children():
                if name != "attn1" and hasattr(attention, "processor"):
                    attention.processor._parallel_config = None

    def text_dim(self, config) -> int:
        """Width of the connectors' video output (the cached prompt embeddings): caption_channels where the
        transformer projects captions itself (LTX-2), else its cross-attention width (LTX-2.3's connectors project)."""
        return config.caption_channels if config.use_prompt_embeddings else config.cross_attention_dim

    def check_latents(self, config, latents):
        if latents.shape[2] != config.in_channels:
            raise ValueError(f"latents have {latents.shape[2]} channels, the transformer takes {config.in_channels}")
        patch, patch_t = config.patch_size, config.patch_size_t
        if latents.shape[1] % patch_t or latents.shape[3] % patch or latents.shape[4] % patch:
            raise ValueError(
                f"latents (B, F, C, h, w) = {tuple(latents.shape)} must divide by the patch size "
                f"({config.patch_size_t}, {config.patch_size}, {config.patch_size}) (F, h, w)"
            )

    # ------------------------------------------------------------------------------------------- objective
    def check_scheduler(self, scheduler):
        if scheduler is None:
            raise ValueError(
                "a noise scheduler is required: pass the model's own (LTX2Family().load_scheduler(model_path)), its "
                "base / max shift set the training sigmas"
            )
        if not is_flow_scheduler(scheduler) or scheduler.config.get("prediction_type") not in (None, "flow_prediction"):
            raise ValueError(
                f"LTX-2 trains with rectified flow: pass a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), "
                f"got {type(scheduler).__name__}"
            )

    def sigma_shift_mu(self, scheduler, num_tokens: int) -> float:
        """mu of the exponential time shift for `num_tokens` video tokens: log(shift) when the family has a fixed
        shift, the pipeline's calculate_shift with the scheduler's base / max shift under dynamic shifting, else
        log(scheduler shift)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

        if self.shift is not None:
            return math.log(self.shift)
        config = scheduler.config
        if not config.get("use_dynamic_shifting"):
            return math.log(float(config.get("shift", 1.0)))
        return float(
            calculate_shift(
                num_tokens,
                config.get("base_image_seq_len", 1024),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.95),
                config.get("max_shift", 2.05),
            )
        )

    def sample_sigmas(self, scheduler, batch_size: int, num_tokens: int, device, generator=None) -> torch.Tensor:
        """(B,) float64 training sigmas for clips of `num_tokens` video tokens, inside `timestep_range` / 1000."""
        gen_device = generator.device if generator is not None else device
        steps = float(scheduler.config.num_train_timesteps)
        low, high = self.timestep_range or (0.0, steps)
        low, high = low / steps, high / steps
        mu = self.sigma_shift_mu(scheduler, num_tokens) + self.logit_mean
        sigmas = torch.full((batch_size,), float("nan"), dtype=torch.float64, device=gen_device)
        for _ in range(1000):  # rejection sampling of the range (one round unless timestep_range is set)
            missing = sigmas.isnan()
            if not missing.any():
                break
            draws = int(missing.sum())
            uniform = torch.rand(draws, generator=generator, device=gen_device, dtype=torch.float64)
            if self.timestep_sampling == "uniform":
                candidate = uniform
            else:
                normal = torch.randn(draws, generator=generator, device=gen_device, dtype=torch.float64)
                stretched = stretched_logit_normal(normal, mu, self.logit_std)
                eps = 1e-3
                use_uniform = torch.rand(draws, generator=generator, device=gen_device, dtype=torch.float64)
                candidate = torch.where(use_uniform > self.uniform_prob, stretched, (1 - eps) * uniform + eps)
            accepted = (candidate >= low) & (candidate < high) if self.timestep_range else candidate.isfinite()
            filled = sigmas[missing]
            filled[accepted] = candidate[accepted]
            sigmas[missing] = filled
        if sigmas.isnan().any():
            raise ValueError(f"timestep_range {self.timestep_range} holds almost none of the training distribution")
        return sigmas.to(device)

    def sample_timesteps(self, scheduler, batch_size, device, generator=None, num_tokens=None):
        """(B,) float timesteps t = 1000 sigma. `num_tokens` (the video token count) sets the shift; required unless
        the family has a fixed `shift` or the scheduler does not shift dynamically."""
        if num_tokens is None:
            if self.shift is None and scheduler.config.get("use_dynamic_shifting"):
                raise ValueError("LTX-2's training sigmas depend on the video token count: pass num_tokens")
            num_tokens = 0
        sigmas = self.sample_sigmas(scheduler, batch_size, num_tokens, device, generator)
        return (sigmas * scheduler.config.num_train_timesteps).float()

    def first_frame_mask(self, batch_size: int, grid, device, generator=None) -> torch.Tensor:
        """(B, N) bool: True on the first latent frame's tokens of the clips drawn for first-frame conditioning."""
        frames, height, width = grid
        mask = torch.zeros(batch_size, frames * height * width, dtype=torch.bool, device=device)
        if self.first_frame_conditioning_p > 0 and frames > 1:
            gen_device = generator.device if generator is not None else device
            drawn = torch.rand(batch_size, generator=generator, device=gen_device) < self.first_frame_conditioning_p
            mask[drawn.to(device), : height * width] = True
        return mask

    def transformer_call(self, transformer, noisy_tokens, grid, prompt_embeds, timestep, prompt_attention_mask=None):
        """The video-only transformer call: packed noisy tokens (B, N, C), timestep (B,) or per token (B, N) as
        1000 sigma -> velocity tokens (B, N, C). The audio stream is isolated from the video
        (`isolate_modalities`) and holds one zero placeholder token: its value never reaches the video tokens,
        and an empty stream fails in the "split" rotary embedding of the released checkpoints."""
        module = self.unwrap(transformer)
        config = module.config
        batch = noisy_tokens.shape[0]
        per_clip = timestep if timestep.dim() == 1 else timestep.amax(dim=1)
        if prompt_attention_mask is None:  # the connectors multiply their output by their mask
            prompt_attention_mask = prompt_embeds.ne(0).any(dim=-1)
        audio_text = prompt_embeds.new_zeros(batch, prompt_embeds.shape[1], self.audio_text_dim(config))
        return transformer(
            hidden_states=noisy_tokens,
            audio_hidden_states=noisy_tokens.new_zeros(batch, 1, config.audio_in_channels),
            encoder_hidden_states=prompt_embeds,
            audio_encoder_hidden_states=audio_text,
            timestep=timestep,
            audio_timestep=per_clip,
            sigma=per_clip,
            encoder_attention_mask=prompt_attention_mask.to(noisy_tokens.dtype),
            audio_encoder_attention_mask=prompt_attention_mask.to(noisy_tokens.dtype),
            num_frames=grid[0],
            height=grid[1],
            width=grid[2],
            fps=self.fps,
            audio_num_frames=1,
            isolate_modalities=True,
            return_dict=False,
        )[0]

    def audio_text_dim(self, config) -> int:
        """Width of the connectors' audio output the placeholder audio stream cross-attends to."""
        return config.caption_channels if config.use_prompt_embeddings else config.audio_cross_attention_dim

    def denoise_and_loss(
        self,
        transformer,
        scheduler,
        latents,
        prompt_embeds,
        *,
        timesteps=None,
        noise=None,
        generator=None,
        prompt_attention_mask=None,
    ):
        """x_t = (1 - sigma) x0 + sigma eps on the packed tokens; v_hat = transformer(x_t, prompt, 1000 sigma);
        loss = mean over clips of the masked mean of (v_hat - (eps - x0))^2; x0_hat = x_t - sigma v_hat.
        `timesteps` (B,) are 1000 sigma; first-frame conditioning tokens keep sigma 0 and no loss."""
        self.check_scheduler(scheduler)
        module = self.unwrap(transformer)
        config = module.config
        batch = latents.shape[0]
        grid = self.token_grid(config, tuple(latents.shape))
        clean = pack_latents(latents.float(), config.patch_size, config.patch_size_t)
        if timesteps is None:
            timesteps = self.sample_timesteps(scheduler, batch, latents.device, generator, num_tokens=clean.shape[1])
        timesteps = timesteps.to(device=latents.device, dtype=torch.float32)
        if noise is None:
            gen_device = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noise = pack_latents(noise.to(latents.device).float(), config.patch_size, config.patch_size_t)
        conditioning = self.first_frame_mask(batch, grid, latents.device, generator)
        sigma = (timesteps / scheduler.config.num_train_timesteps)[:, None].expand(batch, clean.shape[1])
        sigma = torch.where(conditioning, torch.zeros_like(sigma), sigma)
        noisy = (1 - sigma[..., None]) * clean + sigma[..., None] * noise
        token_timesteps = sigma * scheduler.config.num_train_timesteps
        timestep = token_timesteps if conditioning.any() else timesteps
        velocity = self.transformer_call(
            transformer, noisy.to(latents.dtype), grid, prompt_embeds, timestep, prompt_attention_mask
        ).float()
        keep = (~conditioning).float()[..., None]
        squared = (velocity - (noise - clean)).pow(2) * keep
        loss = (squared.mean(dim=(1, 2)) / keep.mean(dim=(1, 2)).clamp(min=1e-8)).mean()
        x0_pred = unpack_latents(noisy - sigma[..., None] * velocity, grid, config.patch_size, config.patch_size_t)
        return {
            "loss": loss,
            "x0_pred": x0_pred.to(latents.dtype),
            "timesteps": timesteps,
            "noisy_latents": unpack_latents(noisy, grid, config.patch_size, config.patch_size_t).to(latents.dtype),
        }

    def x0_from_output(self, scheduler, model_output, sample, timestep, transformer_kwargs=None):
        """x0 = x_t - sigma v (LTX2Pipeline.convert_velocity_to_x0) of one sampling step, (B, F, C, H, W). The
        pipeline steps packed tokens (B, N, C); their grid is the step's transformer call's num_frames, height and
        width (tokens; patch size 1, the released checkpoints')."""
        index = int((scheduler.timesteps.to(sample.device) - timestep).abs().argmin())
        sigma = scheduler.sigmas[index].to(device=sample.device, dtype=torch.float32)
        grid = self.transformer_input_grid(None, tuple(sample.shape), transformer_kwargs)
        return unpack_latents(sample.float() - sigma * model_output, grid)

    def set_sampling_timesteps(self, scheduler, num_inference_steps, latent_shape):
        """LTX2Pipeline's schedule: sigmas linspace(1, 1 / N, N), shifted by mu for the clip's F h w video tokens
        (patch size 1, the released checkpoints')."""
        import numpy as np
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

        config = scheduler.config
        _, frames, _, height, width = latent_shape
        mu = calculate_shift(
            frames * height * width, config.get("base_image_seq_len", 1024),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.95), config.get("max_shift", 2.05),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)

    def guidance_prompt(self, pipe, arguments, outputs):
        """What the motion predictor trained on: the connectors' video output for the conditional Gemma embeddings
        of `pipe.encode_prompt` (its outputs: embeddings, mask, negative embeddings, negative mask), with the real
        tokens in the connector's order."""
        embeds, mask = outputs[0], outputs[1]
        with torch.no_grad():
            video, _, _ = pipe.connectors(embeds, mask, padding_side=getattr(pipe.tokenizer, "padding_side", "left"))
        return video, self._real_tokens(pipe, mask)

    @staticmethod
    def _real_tokens(pipe, mask):
        """(B, L) bool: where the connector output holds the prompt's tokens (moved to the front when the connector
        fills the padding with its learnable registers)."""
        if pipe.connectors.video_connector.learnable_registers is None:
            return mask.bool()
        positions = torch.arange(mask.shape[1], device=mask.device)
        return positions[None] < mask.sum(dim=1, keepdim=True)

    # ------------------------------------------------------------------------------------------- tiny models
    def tiny_components(self, num_layers: int = 2, seed: int = 0) -> dict:
        """The components of an LTX2Pipeline, tiny and random: LTX-2.0's layout (transformer-side caption projection,
        connectors with learnable registers), a VAE compressing 16x in space and 4x in time (the released one: 32x /
        8x) so that the tiny preset's 9-frame clips keep 3 latent frames, and LTX-2's dynamically shifted
        scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tokenizer = tiny_gemma_tokenizer()
        text_encoder = tiny_gemma3(len(tokenizer), seed=seed)
        return {
            "scheduler": FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                max_image_seq_len=4096, shift_terminal=0.1,
            ),
            "vae": tiny_ltx2_vae(seed=seed),
            "audio_vae": tiny_ltx2_audio_vae(seed=seed),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "connectors": tiny_ltx2_connectors(text_encoder.config.text_config.num_hidden_layers + 1, seed),
            "transformer": tiny_ltx2_transformer(num_layers, seed=seed),
            "vocoder": tiny_ltx2_vocoder(seed=seed),
        }


def vae_latent_statistics(vae_dir) -> tuple[list[float], list[float]]:
    """latents_mean and latents_std of a saved AutoencoderKLLTX2Video (buffers in its safetensors weights)."""
    from safetensors import safe_open

    vae_dir = Path(vae_dir)
    index = vae_dir / "diffusion_pytorch_model.safetensors.index.json"
    files = {}
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {key: vae_dir / weight_map[key] for key in ("latents_mean", "latents_std") if key in weight_map}
    else:
        single = vae_dir / "diffusion_pytorch_model.safetensors"
        files = {key: single for key in ("latents_mean", "latents_std")} if single.is_file() else {}
    if len(files) != 2:
        raise FileNotFoundError(f"{vae_dir} holds no latents_mean / latents_std (an AutoencoderKLLTX2Video folder)")
    values = []
    for key in ("latents_mean", "latents_std"):
        with safe_open(str(files[key]), framework="pt") as handle:
            values.append(handle.get_tensor(key).float().tolist())
    return values[0], values[1]


def tiny_gemma_tokenizer():
    """A GemmaTokenizer over single characters (any lowercase caption tokenises), built offline."""
    from transformers import GemmaTokenizer

    vocab = {token: index for index, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"))}
    for character in "abcdefghijklmnopqrstuvwxyz0123456789.,'-":
        vocab.setdefault(character, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def tiny_gemma3(vocab_size: int, seed: int = 0):
    """Gemma3ForConditionalGeneration with a 2-layer text model TINY_TEXT_DIM wide (and a 1-layer vision tower it
    never uses)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tsa.models.tiny import TINY_TEXT_DIM

    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=TINY_TEXT_DIM, intermediate_size=2 * TINY_TEXT_DIM,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=TINY_TEXT_DIM // 2,
            max_position_embeddings=GEMMA_MAX_SEQUENCE_LENGTH, sliding_window=16,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=vocab_size,
        eoi_token_index=vocab_size + 1,
        image_token_index=vocab_size + 2,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def tiny_ltx2_connectors(num_text_layers: int = 3, seed: int = 0):
    """LTX2TextConnectors for a TINY_TEXT_DIM-wide Gemma with `num_text_layers` hidden states (embeddings included):
    one block per stream, 2 heads x TINY_TEXT_DIM / 2, 8 learnable registers (the released connectors: 128)."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    from tsa.models.tiny import TINY_TEXT_DIM

    torch.manual_seed(seed)
    return LTX2TextConnectors(
        caption_channels=TINY_TEXT_DIM,
        text_proj_in_factor=num_text_layers,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=TINY_TEXT_DIM // 2,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=8,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=TINY_TEXT_DIM // 2,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=8,
        connector_rope_base_seq_len=GEMMA_MAX_SEQUENCE_LENGTH,
        rope_double_precision=False,
    ).eval()


def tiny_ltx2_transformer(num_layers: int = 2, seed: int = 0):
    """LTX2VideoTransformer3DModel: video 2 heads x 8, audio 2 heads x 4, patch 1, TINY_LATENT_CHANNELS, captions
    TINY_TEXT_DIM wide, positions scaled for the tiny VAE."""
    from diffusers import LTX2VideoTransformer3DModel

    from tsa.models.tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        vae_scale_factors=(4, 16, 16),
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=num_layers,
        caption_channels=TINY_TEXT_DIM,
        rope_double_precision=False,
    )


def tiny_ltx2_vae(seed: int = 0):
    """AutoencoderKLLTX2Video, 16x spatial / 4x temporal (patch 2, three 2x down blocks, the first spatial only),
    with non-trivial latents_mean / latents_std."""
    from diffusers import AutoencoderKLLTX2Video

    from tsa.models.tiny import TINY_LATENT_CHANNELS

    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        latent_channels=TINY_LATENT_CHANNELS,
        block_out_channels=(8, 16, 32),
        down_block_types=("LTX2VideoDownBlock3D",) * 3,
        decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatial", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        patch_size=2,
        decoder_causal=False,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    vae.latents_mean.copy_(torch.randn(TINY_LATENT_CHANNELS, generator=generator) * 0.5)
    vae.latents_std.copy_(torch.rand(TINY_LATENT_CHANNELS, generator=generator) * 1.5 + 0.5)
    return vae


def tiny_ltx2_audio_vae(seed: int = 0):
    """AutoencoderKLLTX2Audio with 2 latent channels over 8 mel bins (the pipeline decodes audio with it)."""
    from diffusers import AutoencoderKLLTX2Audio

    torch.manual_seed(seed)
    return AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()


def tiny_ltx2_vocoder(seed: int = 0):
    """LTX2Vocoder for the tiny audio VAE's 2 x 8 mel channels."""
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    return LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    ).eval()
