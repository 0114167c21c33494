"""Analyses and plots (attention analysis comes with the trained agents)."""
