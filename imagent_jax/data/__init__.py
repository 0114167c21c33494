"""Datasets: procedural synthetic scenes and (later) multi-image QA builders and pipelines."""
