"""Datasets: the source registry (synthetic, tfds array_record, JSONL), the grain pipeline and the
procedural synthetic multi-image fine-grained QA generator."""
