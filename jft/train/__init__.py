"""Supervised fine-tuning: the functional step and the convenience loop."""

from jft.train.optim import adamw, schedule
from jft.train.sft import SFT, TrainingDiverged, TrainState, plot_losses
from jft.train.step import REMAT_POLICIES, eval_loss, loss_and_grads, make_sft_step, next_token_labels, token_losses

__all__ = ["REMAT_POLICIES", "SFT", "TrainState", "TrainingDiverged", "adamw", "eval_loss", "loss_and_grads",
           "make_sft_step", "next_token_labels", "plot_losses", "schedule", "token_losses"]
