"""LaMo: a self-supervised latent motion prior (motion drift loss in training, motion prior guidance in sampling)."""

from .guidance import MotionPriorGuidance, enable_motion_guidance, motion_guidance_loss
from .losses import MotionDriftLoss, drift_timestep_weight, predictor_loss
from .predictor import MotionPredictor
from .trainer import LaMoTrainer

__all__ = [
    "LaMoTrainer",
    "MotionDriftLoss",
    "MotionPredictor",
    "MotionPriorGuidance",
    "drift_timestep_weight",
    "enable_motion_guidance",
    "motion_guidance_loss",
    "predictor_loss",
]
