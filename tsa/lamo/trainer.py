"""LaMoTrainer: the motion predictor's own optimiser and schedule inside the denoiser's training loop."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.optimization import get_cosine_schedule_with_warmup

from tsa.models.base import noise_level_alphas_cumprod

from .losses import MotionDriftLoss, drift_timestep_weight, predictor_loss
from .predictor import MotionPredictor

TRAINER_CONFIG_NAME = "lamo_trainer.json"
TRAINER_STATE_NAME = "lamo_trainer_state.pt"


class LaMoTrainer:
    """Owns a MotionPredictor's AdamW + cosine schedule and the denoiser's Motion Drift Loss (docs/method.md, "LaMo").

    In the training loop, per batch of clean scaled latents (B, F, C, h, w) and prompt embeddings (B, L, D):

        lamo_loss = trainer.step(latents, prompt_embeds)               # one predictor update, returns a float
        loss = out["diffusion"] + drift_weight * trainer.drift_loss(out["x0_pred"], out["x0"], out["timesteps"])

    `step` detaches its inputs, so nothing but the predictor is updated; `drift_loss` does not use the
    predictor and only reaches the denoiser through x0_pred. `total_steps` counts `step` calls.

    Multi-process (accelerate): do not pass the predictor or this optimiser to `accelerator.prepare`; call
    `trainer.prepare(accelerator)` once instead. It moves the predictor to the process's device and
    broadcasts process 0's weights; every `step` then averages the predictor's gradients over processes, so
    the copies stay identical under DDP, DeepSpeed or FSDP for the denoiser. The predictor always trains in
    float32 (inputs are cast). Checkpoint with `trainer.save(dir)` on the main process and resume with
    `LaMoTrainer.load(dir)` (then `prepare` again); the trainer also has state_dict / load_state_dict, so
    `accelerator.register_for_checkpointing(trainer)` works too.
    """

    def __init__(
        self,
        predictor: MotionPredictor,
        lr: float = 5e-4,
        total_steps: int = 1000,
        *,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = 1.0,
        alpha: float = 0.3,
        lag: int = 1,
        noise_prob: float = 0.5,
        noise_scale: float = 0.3,
        drift_lag: int = 2,
        drift_eps: float = 1e-8,
        noise_scheduler=None,
    ):
        if not isinstance(predictor, MotionPredictor):
            raise TypeError(f"predictor must be a MotionPredictor, got {type(predictor).__name__}")
        if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, "
                             f"{warmup_steps}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.predictor = predictor.float().train()
        self.config = dict(
            lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, betas=list(betas), weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, alpha=alpha, lag=lag, noise_prob=noise_prob, noise_scale=noise_scale,
            drift_lag=drift_lag, drift_eps=drift_eps,
        )
        if noise_scheduler is None and noise_prob > 0:
            raise ValueError("LaMoTrainer needs the model's noise_scheduler for the predictor's noise augmentation "
                             "(or noise_prob=0)")
        self.alphas_cumprod = None if noise_scheduler is None else noise_level_alphas_cumprod(noise_scheduler)
        self.num_train_timesteps = 1000 if noise_scheduler is None else int(noise_scheduler.config.num_train_timesteps)
        self.drift = MotionDriftLoss(lag=drift_lag, eps=drift_eps)
        self.optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.lr_scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        self.accelerator = None

    def prepare(self, accelerator) -> "LaMoTrainer":
        """Put the predictor on `accelerator.device` and sync its weights from process 0 (see the class doc)."""
        from accelerate.utils import broadcast

        self.accelerator = accelerator
        self.predictor.to(accelerator.device)
        if accelerator.num_processes > 1:
            with torch.no_grad():
                for tensor in self.predictor.state_dict().values():
                    tensor.copy_(broadcast(tensor.clone()))
        return self

    def step(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> float:
        """One predictor update on clean latents (B, F, C, h, w); returns the predictor loss."""
        device = next(self.predictor.parameters()).device
        with torch.enable_grad():
            loss = predictor_loss(
                self.predictor,
                latents.detach().to(device),
                None if prompt_embeds is None else prompt_embeds.detach().to(device),
                None if attention_mask is None else attention_mask.to(device),
                alpha=self.config["alpha"],
                lag=self.config["lag"],
                noise_prob=self.config["noise_prob"],
                noise_scale=self.config["noise_scale"],
                alphas_cumprod=self.alphas_cumprod,
                generator=generator,
            )
            loss.backward()
        self._sync_gradients()
        if self.config["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), self.config["max_grad_norm"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _sync_gradients(self) -> None:
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return
        parameters = list(self.predictor.parameters())
        # every process reduces the same list, even where a parameter got no gradient locally
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
        for parameter, mean in zip(parameters, self.accelerator.reduce(grads, reduction="mean")):
            parameter.grad = mean

    def drift_loss(self, x0_pred: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Motion Drift Loss (B, F, C, h, w) x2 times the timestep weight mean_b max(0, 1 - (t_b / T)^2)."""
        weight = drift_timestep_weight(timesteps.to(x0_pred.device), self.num_train_timesteps)
        return weight * self.drift(x0_pred, x0)

    def state_dict(self) -> dict:
        return {
            "config": self.config,
            "predictor": self.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "alphas_cumprod": self.alphas_cumprod,
            "num_train_timesteps": self.num_train_timesteps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.alphas_cumprod = None if state["alphas_cumprod"] is None else state["alphas_cumprod"].float().cpu()
        self.num_train_timesteps = int(state["num_train_timesteps"])

    def save(self, directory: str | Path) -> Path:
        """Write the predictor (config.json + safetensors) and the optimiser / schedule state to `directory`."""
        directory = Path(directory)
        self.predictor.save_pretrained(directory)
        (directory / TRAINER_CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        state = self.state_dict()
        del state["predictor"], state["config"]
        torch.save(state, directory / TRAINER_STATE_NAME)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "LaMoTrainer":
        """Rebuild a trainer saved with `save` (predictor weights, optimiser moments, schedule position)."""
        directory = Path(directory)
        predictor = MotionPredictor.from_pretrained(directory)
        if device is not None:
            predictor.to(device)
        config = json.loads((directory / TRAINER_CONFIG_NAME).read_text())
        config["betas"] = tuple(config["betas"])
        state = torch.load(directory / TRAINER_STATE_NAME, map_location=device or "cpu", weights_only=True)
        saved_schedule = SimpleNamespace(alphas_cumprod=state["alphas_cumprod"],
                                         config=FrozenDict(num_train_timesteps=state["num_train_timesteps"]))
        trainer = cls(predictor, **config, noise_scheduler=None if state["alphas_cumprod"] is None else saved_schedule)
        state["predictor"] = predictor.state_dict()
        trainer.load_state_dict(state)
        return trainer
