"""Reinforcement learning: the training-side log-prob pass, GRPO and the trainer."""
