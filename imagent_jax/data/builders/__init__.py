"""tfds builders and file sources of multi-image QA examples."""
