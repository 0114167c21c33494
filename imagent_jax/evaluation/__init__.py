"""Evaluation: benchmark readers (``benchmarks``), judge-free scoring (``score``), the evaluator the
eval stage and the rl stage's test split share (``evaluator``), metrics of trajectories and probes
of a base."""

from imagent_jax.evaluation.scoring import response_answer, score

__all__ = ["response_answer", "score"]
