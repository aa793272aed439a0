"""Motion Prior Guidance for diffusers' video pipelines (docs/method.md), installed through public methods.

The pipeline's denoising loop calls `scheduler.step(v_hat, ..., t, ..., x_t, ...)` with the model output after
classifier-free guidance and before the update, so the guidance replaces the pipeline scheduler's `step`
(a method bound to that scheduler object, shadowing the class method; the scheduler object and the pipeline's
isinstance checks are unchanged) and adjusts `model_output` before delegating to the real step. The model family
(tsa.models) turns the output into the x0 estimate (`x0_from_output`, which also sees the keywords of the step's
transformer call): CogVideoX's v-prediction x0 = sqrt(ab) x_t - sqrt(1 - ab) v, the flow families'
x0 = x_t - sigma v. The prompt comes from the pipeline's own `encode_prompt` (wrapped the same way), read by the
family's `guidance_prompt`: by default its conditional embeddings and, for prompt strings, the tokenizer's
attention mask, used by a predictor that pools real tokens only (`prompt_pooling="tokens"`; with precomputed
`prompt_embeds` every position is pooled). The denoiser is never re-run.
"""

import functools
import inspect
import math
import types

import torch
import torch.nn.functional as F

from .predictor import MotionPredictor


def motion_guidance_loss(
    predictor: MotionPredictor,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor | None = None,
    lag: int = 1,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE(x0[:, :-lag] + f(x0[:, :-lag], prompt), x0[:, lag:]) for x0 (B, F, C, h, w) with F > lag."""
    if x0.shape[1] <= lag:
        raise ValueError(f"x0 needs more than lag={lag} frames, got {tuple(x0.shape)}")
    head = x0[:, :-lag]
    return F.mse_loss(head + predictor(head, prompt_embeds, attention_mask).to(x0.dtype), x0[:, lag:])


class MotionPriorGuidance:
    """Handle of an installed guidance (see `enable_motion_guidance`); `.remove()` or use as a context manager.

    `prompt_embeds` (B, L, D) / `prompt_mask` (B, L) or None hold the conditioning of the latest pipeline call;
    `history` collects (step index, guidance loss before the update) for every guided step.
    """

    def __init__(self, pipe, predictor: MotionPredictor, scale: float, rho: float, lag: int,
                 start_rounding: str = "floor", family=None):
        from tsa.models import family_for_pipeline

        self.pipe, self.scheduler = pipe, pipe.scheduler
        self.family = family_for_pipeline(pipe) if family is None else family
        self._predictor_was_training = predictor.training
        self.predictor = predictor.eval()
        self.scale, self.rho, self.lag = float(scale), float(rho), int(lag)
        self.start_rounding = start_rounding
        self.history: list[tuple[int, float]] = []
        self.prompt_embeds = self.prompt_mask = None
        self._real_step, self._real_encode_prompt = self.scheduler.step, pipe.encode_prompt
        # update_wrapper keeps the real signatures visible to the pipeline's `inspect.signature(...)` checks. The
        # guided step is a method bound to the scheduler, so that a deep copy of it (a pipeline's second scheduler,
        # e.g. one copied for an audio stream) is bound to the copy, whose steps pass through unguided.
        self._guided_step = types.MethodType(
            functools.update_wrapper(lambda scheduler, *a, **k: self._step(scheduler, *a, **k),
                                     type(self.scheduler).step),
            self.scheduler,
        )
        self.transformer_kwargs: dict = {}
        self._transformer_hooks = [
            module.register_forward_pre_hook(self._record_transformer_call, with_kwargs=True)
            for module in (getattr(pipe, expert, None) for expert in self.family.experts) if module is not None
        ]
        self._capturing_encode_prompt = functools.update_wrapper(
            lambda *a, **k: self._encode_prompt(*a, **k), self._real_encode_prompt
        )
        self.scheduler.step = self._guided_step
        pipe.encode_prompt = self._capturing_encode_prompt

    def _record_transformer_call(self, module, args, kwargs) -> None:
        self.transformer_kwargs = kwargs

    def _encode_prompt(self, *args, **kwargs):
        call = inspect.signature(self._real_encode_prompt).bind(*args, **kwargs)
        call.apply_defaults()
        outputs = self._real_encode_prompt(*args, **kwargs)
        self.prompt_embeds, self.prompt_mask = self.family.guidance_prompt(self.pipe, call.arguments, outputs)
        return outputs

    def _step(self, scheduler, *args, **kwargs):
        if scheduler is not self.scheduler:
            return type(scheduler).step(scheduler, *args, **kwargs)
        call = inspect.signature(self._real_step).bind(*args, **kwargs)
        timestep, sample = call.arguments["timestep"], call.arguments["sample"]
        timesteps = self.scheduler.timesteps
        index = int((timesteps.to(torch.as_tensor(timestep).device) - timestep).abs().argmin())
        if index >= self.first_guided_step(len(timesteps)):
            call.arguments["model_output"] = self.guide(call.arguments["model_output"], sample, timestep, index)
        return self._real_step(*call.args, **call.kwargs)

    def first_guided_step(self, num_steps: int) -> int:
        """Index of the first guided step of `num_steps`: int((1 - rho) * S) as LaMo's released code
        ("floor": 9 of 50 at rho = 0.8, 41 guided steps), or the first s >= (1 - rho) * S ("ceil")."""
        start = (1.0 - self.rho) * num_steps
        return int(start) if self.start_rounding == "floor" else math.ceil(start)

    def guide(self, velocity: torch.Tensor, sample: torch.Tensor, timestep, index: int) -> torch.Tensor:
        """v_hat - scale * dL/dv_hat with x0_hat (B, F, C, h, w) the family's x0 estimate from v_hat and x_t (in the
        pipeline's latent layout), fp32 math. Clips with no more than `lag` latent frames are left unguided."""
        if next(self.predictor.parameters()).device != sample.device:
            self.predictor.to(sample.device)
        prompt_batch = sample.shape[0] if self.prompt_embeds is None else self.prompt_embeds.shape[0]
        if prompt_batch != sample.shape[0]:
            raise ValueError(f"prompt batch {prompt_batch} does not match the latents batch {sample.shape[0]}")
        with torch.enable_grad():
            v = velocity.detach().float().requires_grad_(True)
            x0 = self.family.x0_from_output(self.scheduler, v, sample, timestep, self.transformer_kwargs)
            if x0.shape[1] <= self.lag:
                return velocity
            loss = motion_guidance_loss(self.predictor, x0, self.prompt_embeds, self.lag, self.prompt_mask)
            (grad,) = torch.autograd.grad(loss, v)
        self.history.append((index, loss.item()))
        return (velocity.float() - self.scale * grad).to(velocity.dtype)

    def remove(self) -> None:
        """Restore the scheduler's own step, the pipeline's own encode_prompt and the predictor's training
        mode (idempotent)."""
        for hook in self._transformer_hooks:
            hook.remove()
        self._transformer_hooks = []
        if vars(self.scheduler).get("step") is self._guided_step:
            del self.scheduler.step
        if vars(self.pipe).get("encode_prompt") is self._capturing_encode_prompt:
            del self.pipe.encode_prompt
        if self._predictor_was_training is not None:
            self.predictor.train(self._predictor_was_training)
            self._predictor_was_training = None

    def __enter__(self) -> "MotionPriorGuidance":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def enable_motion_guidance(
    pipe, predictor: MotionPredictor, scale: float = 15.0, rho: float = 0.8, lag: int = 1,
    start_rounding: str = "floor",
) -> MotionPriorGuidance:
    """Install Motion Prior Guidance on a diffusers pipeline of a supported family (CogVideoX with its
    v-prediction scheduler, Wan with its flow-matching one).

    On denoising step s of S (0-based), from s = int((1 - rho) * S) on (LaMo's released code;
    `start_rounding="ceil"`: from the first s >= (1 - rho) * S, the paper's text), the post-CFG velocity becomes
    v_hat - scale * dL/dv_hat with L = motion_guidance_loss(predictor, x0_hat, prompt, lag); the predictor is
    frozen (eval mode, only v_hat gets a gradient). `scale=0` gives the unguided sample bit for bit. The
    guidance stays on the scheduler object that `pipe.scheduler` is now; returns a handle with `.remove()`.
    """
    if not isinstance(predictor, MotionPredictor):
        raise TypeError(f"predictor must be a MotionPredictor, got {type(predictor).__name__}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if lag < 1:
        raise ValueError(f"lag must be >= 1, got {lag}")
    if start_rounding not in ("floor", "ceil"):
        raise ValueError(f"start_rounding must be 'floor' or 'ceil', got {start_rounding!r}")
    from tsa.models import family_for_pipeline

    family = family_for_pipeline(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
    if scheduler is None or transformer is None or not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"pipe must be a video pipeline (scheduler, transformer, encode_prompt), got {type(pipe)}")
    try:
        family.check_scheduler(scheduler)
    except ValueError as error:
        raise ValueError(f"pipe.scheduler: {error}") from None
    if "step" in vars(scheduler) or "encode_prompt" in vars(pipe):
        raise ValueError("pipe already has a motion guidance installed: remove() it first")
    config = transformer.config
    for name, ours, theirs in (
        ("in_channels", predictor.config.in_channels, family.latent_channels(config)),
        ("text_dim", predictor.config.text_dim, family.text_dim(config)),
    ):
        if ours != theirs:
            raise ValueError(f"predictor {name}={ours} does not match the pipeline's transformer ({theirs})")
    return MotionPriorGuidance(pipe, predictor, scale, rho, lag, start_rounding, family)
