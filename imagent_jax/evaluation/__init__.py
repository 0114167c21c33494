"""Evaluation: what trajectories and policies are measured by (metrics of trajectories, probes of a base)."""
