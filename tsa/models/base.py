"""The model-family contract: everything tsa needs to know about one family of diffusers video DiTs.

A family is one module under tsa/models/ with a ModelFamily subclass, registered by one line in
tsa.models.FAMILIES. Nothing outside tsa/models/ names a family or branches on one: the command line, the
training loop, the objective, sampling and the conformance suite (tests/families/) read it all from the
family object. See ModelFamily for what a subclass defines.

Latents outside a family are always (B, F, C, h, w), normalised the way the family's pipeline expects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def unwrap_module(model: nn.Module, is_target) -> nn.Module:
    """The module inside DDP / peft / torch.compile wrappers for which `is_target(module)` holds, or None."""
    while not is_target(model):
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module"):  # DistributedDataParallel, accelerate wrappers
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return None
    return model


def model_index(model_path) -> dict:
    """The model_index.json of a diffusers pipeline folder ({} when there is none)."""
    path = Path(model_path) / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def noise_level_alphas_cumprod(scheduler) -> torch.Tensor:
    """(T,) alphabar_t of a training noise schedule, so that sqrt(1 - alphabar_t) is the noise level at t.

    DDPM-style schedulers carry `alphas_cumprod`; for flow-matching schedulers x_t = (1 - sigma) x0 +
    sigma * eps, the noise level is sigma_t = shift(t / T) and the equivalent alphabar is 1 - sigma_t^2.
    """
    if scheduler is None:
        raise ValueError(
            "a noise scheduler is required (load the model's own, e.g. "
            "tsa.models.detect_family(model_path).load_scheduler(model_path))"
        )
    if getattr(scheduler, "alphas_cumprod", None) is not None and not is_flow_scheduler(scheduler):
        return torch.as_tensor(scheduler.alphas_cumprod).detach().float().cpu()
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        # The shift at base_image_seq_len tokens, where the resolution-dependent mu is base_shift.
        mu = float(config.get("base_shift", 0.5))
        shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    else:
        shift = flow_shift(scheduler)
    steps = int(scheduler.config.num_train_timesteps)
    sigma = shift_sigmas(torch.arange(steps, dtype=torch.float64) / steps, shift)
    return (1 - sigma.square()).float()


def is_flow_scheduler(scheduler) -> bool:
    """Whether a scheduler samples rectified flow: FlowMatch* (no alphas_cumprod) or UniPC / DPM-Solver with
    flow sigmas (Wan's own scheduler folders)."""
    config = getattr(scheduler, "config", {})
    return bool(
        config.get("use_flow_sigmas")
        or config.get("prediction_type") == "flow_prediction"
        or getattr(scheduler, "alphas_cumprod", None) is None
    )


def flow_shift(scheduler) -> float:
    """The timestep shift of a flow-matching scheduler's config (`shift`, or UniPC's `flow_shift`)."""
    config = getattr(scheduler, "config", {})
    if config.get("use_dynamic_shifting"):
        raise ValueError(
            f"{type(scheduler).__name__} uses dynamic (resolution-dependent) shifting; pass the shift explicitly"
        )
    for key in ("shift", "flow_shift"):
        if config.get(key) is not None:
            return float(config[key])
    raise ValueError(
        f"{type(scheduler).__name__} is not a flow-matching scheduler (its config has no shift); "
        "pass the model's own scheduler"
    )


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """shift * sigma / (1 + (shift - 1) * sigma): the resolution shift of flow-matching schedules."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class SamplingDefaults:
    """One model variant's own sampling recipe: tsa-sample's defaults (docs/method.md, "Sampling defaults").

    `guidance_scale_2` is the second (low-noise) expert's scale of a two-expert model (None: one expert);
    `flow_shift` the flow-matching timestep shift (None: the family is not a flow model); `source` names the
    files the values come from."""

    variant: str
    num_inference_steps: int
    guidance_scale: float
    fps: int
    negative_prompt: str = ""
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    source: str = ""


def with_flow_shift(scheduler, shift: float):
    """A copy of a flow-matching scheduler with its timestep shift set to `shift` (`shift`, or UniPC's
    `flow_shift`)."""
    config = dict(scheduler.config)
    key = "shift" if "shift" in config else "flow_shift"
    return type(scheduler).from_config(config, **{key: float(shift)})


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
LORA_EXPERT_KEY = "tsa.expert"  # safetensors metadata: the pipeline component a LoRA file adapts


def record_lora_expert(path, expert: str) -> None:
    """Add the expert a LoRA file adapts to its safetensors metadata (the tensors are rewritten unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**metadata, LORA_EXPERT_KEY: expert})


def read_lora_expert(path) -> str | None:
    """The expert a LoRA file's metadata names (None: a file written without one)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(LORA_EXPERT_KEY)


TIMESTEP_SAMPLING = ("logit-normal", "uniform")  # training timestep densities of flow-matching families


def check_flow_sampling_options(timestep_sampling: str, logit_std: float, shift: float | None) -> None:
    """ValueError naming the option when a flow-matching family's timestep options are out of range."""
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    if shift is not None and not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")


class ModelFamily:
    """One family of video DiTs. Instances may carry objective options (e.g. timestep sampling); `timestep_range`
    = (low, high) restricts training timesteps to [low, high) (one expert of a two-expert model), None uses the
    whole schedule.

    A new family module defines a subclass with:

    - class attributes: `name` (the registry key, tsa-train --model-family), `pipeline_class_names` and
      `transformer_class_names` (diffusers class names, for detection), `experts` (pipeline components that are
      denoisers), `objective_options` (run-config option -> constructor keyword for the family's objective
      options, e.g. {"flow_shift": "shift"}; options not listed are refused for the family),
      `default_lora_target_modules` and `ffn_lora_target_modules`, `default_latents` (the reference trainer's
      --latents), `temporal_compression`, `spatial_multiple`, `default_guidance_scale`, `default_fps`
      (tsa-sample's defaults unless `sampling_defaults` names each variant's own), `presets` (named tsa-train
      option sets), `tiny_preset` (values of the tiny preset the family's tiny models need, e.g. sizes its
      pipeline accepts);
    - loading: `transformer_class`, `pipeline_class`, `load_encoders`, `max_sequence_length` (and `encode_entry`,
      a clip and caption -> a cache entry, where the pipeline's encode_prompt differs from CogVideoX's); the rest
      (`load_transformer`, `load_scheduler`, `load_pipeline`, `from_model_path`) has defaults to override
      where the family's folders differ;
    - latents: `normalize_latents`, `vae_compression`;
    - structure: `blocks`, `token_grid`, `text_dim` (and `video_tokens`, `transformer_input_grid`,
      `default_align_layer`, `check_latents` where the defaults do not fit);
    - objective: `check_scheduler`, `sample_timesteps`, `denoise_and_loss`, `x0_from_output` (and
      `guidance_prompt`, the prompt the motion predictor reads during sampling, where the default does not fit);
    - weights: `save_lora_weights` / `load_lora_into` where the pipeline's LoRA loader needs more than the default;
    - tiny models: `tiny_components(num_layers=2, seed=0, **options)` (a dict of the pipeline's components,
      random, a few thousand parameters, built from tsa.models.tiny's shared pieces) - `save_tiny_pipeline`,
      tsa-train --preset tiny and the conformance suite (tests/families/) build on it.

    Registering the module in tsa.models.FAMILIES is then all it takes for the command line, the training loop,
    tsa-sample, tsa-viz and the conformance suite to cover the family.
    """

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    transformer_class_names: tuple[str, ...] = ()
    experts: tuple[str, ...] = ("transformer",)  # pipeline components that are denoisers
    default_lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # --lora-target-modules attn
    ffn_lora_target_modules: tuple[str, ...] = ()  # added by --lora-target-modules attn+ffn
    default_latents: str = "sample"  # tsa-train --latents: train on a VAE posterior "sample" or its "mean"
    image_pipeline_class_names: tuple[str, ...] = ()  # the image-to-video pipelines among pipeline_class_names
    image_to_video: bool = False  # set per folder by from_model_path: the model takes a first-frame condition
    temporal_compression: int = 4
    spatial_multiple: int = 16
    default_guidance_scale: float = 6.0
    default_fps: int = 8
    presets: dict[str, dict] = {}
    objective_options: dict[str, str] = {}  # run-config option -> keyword of the constructor (see options_from)
    tiny_preset: dict = {}  # values over the tiny preset's when its models are this family's

    def __init__(self, timestep_range: tuple[float, float] | None = None):
        if timestep_range is not None:
            low, high = (float(value) for value in timestep_range)
            if not 0 <= low < high <= 1000:
                raise ValueError(
                    f"timestep_range must be (low, high) with 0 <= low < high <= 1000, got {timestep_range}"
                )
            timestep_range = (low, high)
        self.timestep_range = timestep_range

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timestep_range={self.timestep_range})"

    @classmethod
    def from_model_path(cls, model_path, expert: str = "transformer", **options) -> ModelFamily:
        """The family configured for one pipeline folder and the expert a run trains (options left None take
        the model's values)."""
        if expert not in cls.experts:
            raise ValueError(f"{cls.name} pipelines have the denoisers {cls.experts}, got expert={expert!r}")
        family = cls._with_options(**options)
        family.image_to_video = cls.is_image_to_video(model_path)
        return family

    @classmethod
    def is_image_to_video(cls, model_path) -> bool:
        """Whether a pipeline folder holds an image-to-video model (model_index.json's class)."""
        return model_index(model_path).get("_class_name") in cls.image_pipeline_class_names

    @classmethod
    def tasks(cls, model_path) -> tuple[str, ...]:
        """The tasks a pipeline folder's model does, its default first: ("t2v",), ("i2v",) or both."""
        return ("i2v",) if cls.is_image_to_video(model_path) else ("t2v",)

    @classmethod
    def options_from(cls, values) -> dict:
        """The family's objective options (constructor keywords) out of a run config (an object with attributes
        or a mapping, e.g. a TrainConfig or a run's training_args.json); options left None are left out."""
        get = values.get if isinstance(values, dict) else lambda key: getattr(values, key, None)
        return {keyword: get(option) for option, keyword in cls.objective_options.items() if get(option) is not None}

    @classmethod
    def _with_options(cls, **options) -> ModelFamily:
        options = {key: value for key, value in options.items() if value is not None}
        try:
            return cls(**options)
        except TypeError as error:
            raise ValueError(f"the {cls.name} family does not take the options {sorted(options)} ({error})") from None

    # ------------------------------------------------------------------------------------------- loading
    def transformer_class(self):
        raise NotImplementedError

    def pipeline_class(self):
        raise NotImplementedError

    def load_transformer(self, model_path, subfolder: str = "transformer", dtype=torch.float32) -> nn.Module:
        if subfolder not in self.experts:
            raise ValueError(f"{self.name} pipelines have the denoisers {self.experts}, got {subfolder!r}")
        if not (Path(model_path) / subfolder / "config.json").is_file():
            raise FileNotFoundError(f"{model_path} has no {subfolder}/ (a diffusers {self.name} pipeline folder)")
        return self.transformer_class().from_pretrained(model_path, subfolder=subfolder, torch_dtype=dtype)

    def load_scheduler(self, model_path):
        """The pipeline folder's own scheduler (its class from scheduler_config.json)."""
        import diffusers

        path = Path(model_path) / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_path} has no scheduler/scheduler_config.json (a diffusers pipeline folder is expected)"
            )
        config = json.loads(path.read_text())
        return getattr(diffusers, config["_class_name"]).from_pretrained(model_path, subfolder="scheduler")

    def load_pipeline(self, model_path, dtype=torch.float32, image_to_video: bool = False):
        """The folder's own pipeline class (text- or image-to-video) with its weights; `image_to_video` loads a
        model that does both (Wan2.2 TI2V-5B) into the family's image-to-video pipeline."""
        import diffusers

        name = model_index(model_path).get("_class_name")
        if image_to_video and name not in self.image_pipeline_class_names:
            name = self.image_pipeline_class_names[0]
        cls = getattr(diffusers, name) if name in self.pipeline_class_names else self.pipeline_class()
        return cls.from_pretrained(model_path, torch_dtype=dtype)

    def load_encoders(self, model_path, device="cpu", dtype=torch.float32, tiling: bool = False):
        """A pipeline holding only the VAE, tokenizer and text encoder (for the latent cache)."""
        raise NotImplementedError

    def max_sequence_length(self, model_path) -> int:
        """Text tokens per prompt that the pipeline encodes."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_entry(self, pipe, pixels: torch.Tensor, caption: str, max_sequence_length: int) -> dict:
        """One latent-cache entry from the `load_encoders` pipeline: pixels (T, 3, H, W) in [-1, 1] and a caption ->
        {"latent_dist" (2C, F, h, w), "prompt_embeds" (L, D), "prompt_mask" (L,) bool: the tokenizer's attention
        mask, for pooling over real tokens}."""
        device, dtype = pipe.vae.device, pipe.vae.dtype
        video = pixels.to(device, dtype).permute(1, 0, 2, 3).unsqueeze(0)
        latent_dist = pipe.vae.encode(video).latent_dist.parameters[0]
        prompt_embeds, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device,
            dtype=dtype,
        )
        prompt_mask = pipe.tokenizer(
            caption, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt",
        ).attention_mask[0]
        entry = {"latent_dist": latent_dist.contiguous().cpu(), "prompt_embeds": prompt_embeds[0].contiguous().cpu(),
                 "prompt_mask": prompt_mask.bool()}
        if self.image_to_video:  # what the first-frame condition needs
            entry.update(self.encode_image_condition(pipe, video))
        return entry

    def lora_target_modules(self, spec) -> list[str]:
        """Module names for LoRA from `spec`: None or "attn" (the attention projections), "attn+ffn" (and the
        feed-forward layers), or module names (a list or a comma-separated string). ValueError."""
        if spec is None or spec == "attn":
            return list(self.default_lora_target_modules)
        if spec == "attn+ffn":
            if not self.ffn_lora_target_modules:
                raise ValueError(f"the {self.name} family names no feed-forward modules; give the module names")
            return [*self.default_lora_target_modules, *self.ffn_lora_target_modules]
        names = [name.strip() for name in (spec.split(",") if isinstance(spec, str) else spec) if name.strip()]
        if not names:
            raise ValueError(f"give attn, attn+ffn or module names, got {spec!r}")
        return names

    # ------------------------------------------------------------------------------------------- image-to-video
    def encode_image_condition(self, encoders, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cache-time tensors of the first-frame condition of a clip `video` (1, 3, T, H, W) in [-1, 1], with the
        pipeline `load_encoders` returns (image-to-video models only; each tensor without the batch axis)."""
        raise NotImplementedError(f"the {self.name} family has no image-to-video conditioning")

    def image_condition(self, batch: dict, vae_config: dict, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keyword arguments of `denoise_and_loss` that condition a batch on its first frames (from the cached
        tensors of `encode_image_condition`, stacked), built as the family's image-to-video pipeline builds them;
        {} for a text-to-video model."""
        return {}

    # ------------------------------------------------------------------------------------------- sampling
    def sampling_defaults(self, model_path, height: int | None = None, width: int | None = None) -> SamplingDefaults:
        """The sampling recipe of the model variant in `model_path` at `height` x `width` pixels (None: the
        pipeline's default size). The default: 50 steps, the class's guidance scale and fps, no negative prompt,
        the folder's own scheduler shift."""
        return SamplingDefaults(variant=self.name, num_inference_steps=50, guidance_scale=self.default_guidance_scale,
                                fps=self.default_fps)

    # ------------------------------------------------------------------------------------------- latents
    def latents_from_distribution(
        self, latent_dist: torch.Tensor, vae_config: dict, sample: bool = True
    ) -> torch.Tensor:
        """Cached VAE latent distributions (B, 2C, F, h, w) -> a normalised sample (B, F, C, h, w), float32
        (`sample=False`: the distribution's mode, no randomness)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        distribution = DiagonalGaussianDistribution(latent_dist.float())
        return self.normalize_latents(distribution.sample() if sample else distribution.mode(), vae_config)

    def normalize_latents(self, latents: torch.Tensor, vae_config: dict) -> torch.Tensor:
        """Raw VAE latents (B, C, F, h, w) -> the normalised latents the transformer trains on, (B, F, C, h, w)."""
        raise NotImplementedError

    def vae_compression(self, vae_config: dict) -> tuple[int, int]:
        """(temporal, spatial) compression of the family's VAE, from its config."""
        raise NotImplementedError

    def latent_shape(self, model_path, num_frames: int, height: int, width: int, expert: str = "transformer"):
        """(1, F, C, h, w) latents of a clip of `num_frames` x `height` x `width` pixels, from the configs alone."""
        temporal, spatial = self.vae_compression(json.loads((Path(model_path) / "vae" / "config.json").read_text()))
        config = json.loads((Path(model_path) / expert / "config.json").read_text())
        return 1, (num_frames - 1) // temporal + 1, config["in_channels"], height // spatial, width // spatial

    def check_frames(self, num_frames: int) -> str | None:
        """An error message when the pixel frame count does not suit the VAE, else None."""
        ratio = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % ratio:
            return f"--num-frames must be {ratio}k+1 (the VAE compresses time by {ratio}), got {num_frames}"
        return None

    # ------------------------------------------------------------------------------------------- structure
    def is_transformer(self, module) -> bool:
        return type(module).__name__ in self.transformer_class_names

    def unwrap(self, model: nn.Module) -> nn.Module:
        module = unwrap_module(model, self.is_transformer)
        if module is None:
            raise TypeError(
                f"transformer must be one of {self.transformer_class_names} (a {self.name} diffusers "
                f"transformer), got {type(model).__name__}"
            )
        return module

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        """The transformer blocks, in order; block i's output holds the video tokens (see video_tokens)."""
        raise NotImplementedError

    def context_parallel_plan(self, config=None):
        """diffusers' context-parallel plan of the family's transformer (its class's `_cp_plan`: where the hidden
        states are split into token slices and gathered again), or None when it has none; `config` (the
        transformer's, when known) lets a family fit the plan to the model's layout."""
        return getattr(self.transformer_class(), "_cp_plan", None)

    def enable_context_parallel(self, transformer: nn.Module, config) -> None:
        """diffusers' context parallelism (a ContextParallelConfig) on the unwrapped transformer, with the family's
        plan."""
        transformer.enable_parallelism(config=config, cp_plan=self.context_parallel_plan(transformer.config))

    def token_grid(self, config, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(F, H, W) video-token grid of the transformer for latents of shape (B, F, C, h, w)."""
        raise NotImplementedError

    def video_tokens(self, block_output, grid: tuple[int, int, int]) -> torch.Tensor:
        """A block's output -> its video tokens (B, F, H, W, C) (frame-major token order)."""
        hidden_states = block_output[0] if isinstance(block_output, tuple) else block_output
        batch, num_tokens, channels = hidden_states.shape
        frames, height, width = grid
        if num_tokens != frames * height * width:
            raise RuntimeError(f"block returned {num_tokens} video tokens, expected {frames}x{height}x{width}")
        return hidden_states.view(batch, frames, height, width, channels)

    def transformer_input_grid(self, config, hidden_states_shape: tuple[int, ...], call_kwargs=None):
        """(F, H, W) for the transformer's `hidden_states` input, in the transformer's own layout; `call_kwargs`
        are the call's keywords (for transformers taking packed tokens and their grid separately)."""
        return self.token_grid(config, hidden_states_shape)

    def width(self, config) -> int:
        return config.num_attention_heads * config.attention_head_dim

    def text_dim(self, config) -> int:
        raise NotImplementedError

    def latent_channels(self, config) -> int:
        return config.out_channels

    def default_align_layer(self, num_blocks: int | None) -> int | None:
        """The 1-based block whose features are aligned by default (about 60% depth); None when it depends on
        the depth and `num_blocks` is None (not known before the model loads)."""
        return None if num_blocks is None else max(1, round(0.6 * num_blocks))

    def check_latents(self, config, latents: torch.Tensor) -> None:
        """Raise ValueError when latents (B, F, C, h, w) cannot enter the transformer."""

    # ------------------------------------------------------------------------------------------- objective
    def check_scheduler(self, scheduler) -> None:
        """Raise ValueError when `scheduler` is not a training / sampling schedule of this family."""
        raise NotImplementedError

    def sample_timesteps(self, scheduler, batch_size: int, device, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def denoise_and_loss(
        self, transformer, scheduler, latents, prompt_embeds, *, timesteps=None, noise=None, generator=None
    ) -> dict[str, torch.Tensor]:
        """One training forward on clean latents (B, F, C, h, w) and prompt_embeds (B, L, D).
        Returns {"loss", "x0_pred" (B, F, C, h, w), "timesteps" (B,), "noisy_latents"}."""
        raise NotImplementedError

    def x0_from_output(self, scheduler, model_output, sample, timestep, transformer_kwargs=None) -> torch.Tensor:
        """The x0 estimate (B, F, C, h, w) of one sampling step from the model output and the current sample,
        both in the pipeline's own latent layout; differentiable in model_output (motion guidance).
        `transformer_kwargs`: the keywords of the step's transformer call (for layouts the tensors alone do not
        determine)."""
        raise NotImplementedError

    def set_sampling_timesteps(self, scheduler, num_inference_steps: int, latent_shape: tuple[int, ...]) -> None:
        """Set `scheduler`'s timesteps as the family's pipeline does for latents of `latent_shape` (B, F, C, h, w)."""
        scheduler.set_timesteps(num_inference_steps)

    def guidance_prompt(self, pipe, arguments: dict, outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings (B, L, D), mask (B, L) or None) the motion predictor reads, from one `pipe.encode_prompt`
        call (its bound `arguments` and its `outputs`): the conditional embeddings and, for prompt strings, the
        tokenizer's attention mask (as the cache's prompt_mask)."""
        prompt_embeds = outputs[0]
        prompt = arguments.get("prompt")
        if arguments.get("prompt_embeds") is not None or prompt is None:
            return prompt_embeds, None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        mask = pipe.tokenizer(
            prompts, padding="max_length", max_length=arguments.get("max_sequence_length", 226), truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).attention_mask
        copies = prompt_embeds.shape[0] // mask.shape[0]
        return prompt_embeds, mask.repeat_interleave(copies, dim=0).to(prompt_embeds.device)

    # ------------------------------------------------------------------------------------------- weights
    def save_lora_weights(self, output_dir, lora_layers: dict, metadata: dict, expert: str = "transformer"):
        """Write `lora_layers` (peft state dict of `expert`) as the pipeline's load_lora_weights expects, with the
        expert it adapts in the file's metadata (LORA_EXPERT_KEY)."""
        self.pipeline_class().save_lora_weights(
            output_dir, transformer_lora_layers=lora_layers, transformer_lora_adapter_metadata=metadata
        )
        record_lora_expert(Path(output_dir) / LORA_WEIGHTS, expert)

    def lora_expert(self, lora_dir, expert: str | None = None) -> str:
        """The expert a LoRA file adapts (its metadata; files without one adapt `transformer`), checked against
        the `expert` a caller asks for (None: whichever the file names). ValueError in one line."""
        recorded = read_lora_expert(Path(lora_dir) / LORA_WEIGHTS) or "transformer"
        if expert is not None and expert != recorded:
            raise ValueError(
                f"{Path(lora_dir) / LORA_WEIGHTS} adapts {recorded}, not {expert}: load it into {recorded}"
            )
        if recorded not in self.experts:
            raise ValueError(f"{Path(lora_dir) / LORA_WEIGHTS} adapts {recorded}, which {self.name} pipelines do not "
                             f"have (their denoisers: {', '.join(self.experts)})")
        return recorded

    def load_run_weights(self, pipe, run_dir, expert: str | None = None, dtype=torch.float32):
        """Put a finished tsa-train run's weights (full `expert/` folder or LoRA file, into the expert the file
        names) into `pipe`. A LoRA file for another expert than `expert`, or one the pipeline lacks: ValueError."""
        run_dir = Path(run_dir)
        if expert is not None and (run_dir / expert).is_dir():
            setattr(pipe, expert, self.transformer_class().from_pretrained(run_dir / expert, torch_dtype=dtype))
        elif (run_dir / LORA_WEIGHTS).is_file():
            expert = self.lora_expert(run_dir, expert)
            if getattr(pipe, expert, None) is None:
                raise ValueError(f"{run_dir / LORA_WEIGHTS} adapts {expert}, and this {type(pipe).__name__} has none")
            self.load_lora_into(pipe, run_dir, expert)
        else:
            raise FileNotFoundError(
                f"{run_dir} holds neither {expert or 'transformer'}/ nor {LORA_WEIGHTS} "
                "(the final weights of a finished tsa-train run)"
            )
        return pipe

    def load_lora_into(self, pipe, run_dir, expert: str = "transformer"):
        pipe.load_lora_weights(run_dir)

    def load_trained_transformer(self, run_dir, model_path, expert: str = "transformer", dtype=torch.float32):
        """A finished run's `expert` alone (no pipeline): RUN_DIR/expert (full fine-tune), or the base model's
        with the run's LoRA file as a peft adapter (`disable_adapters()` gives the base model back); a LoRA file
        for another expert: ValueError."""
        run_dir = Path(run_dir)
        if (run_dir / expert).is_dir():
            return self.transformer_class().from_pretrained(run_dir / expert, torch_dtype=dtype)
        if not (run_dir / LORA_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{run_dir} holds neither {expert}/ nor {LORA_WEIGHTS} (the final weights of a finished tsa-train run)"
            )
        self.lora_expert(run_dir, expert)
        transformer = self.load_transformer(model_path, expert, dtype)
        # save_lora_weights writes every expert's layers under the pipeline's "transformer" prefix
        transformer.load_lora_adapter(run_dir, weight_name=LORA_WEIGHTS, prefix="transformer")
        return transformer

    # ------------------------------------------------------------------------------------------- tiny models
    def tiny_components(self, num_layers: int = 2, seed: int = 0, **options) -> dict:
        """The components of the family's pipeline, tiny and random (options: the family's tiny variants)."""
        raise NotImplementedError

    def save_tiny_pipeline(self, path, num_layers: int = 2, seed: int = 0, **options) -> Path:
        """Save a tiny random pipeline folder of this family's real classes (CPU tests, --preset tiny)."""
        path = Path(path)
        pipeline = self.tiny_pipeline_class(**options)
        pipeline(**self.tiny_components(num_layers=num_layers, seed=seed, **options)).save_pretrained(path)
        return path

    def tiny_pipeline_class(self, **options):
        """The pipeline class of a tiny model with `options` (the image-to-video one for `i2v=True`)."""
        return self.pipeline_class()
