"""Reinforcement learning: masks, rewards, advantages, losses, the optimiser, the training-side
log-prob pass, the rollout-to-batch pipeline, GRPO, the trainer, and the warmup's SFT pieces."""
