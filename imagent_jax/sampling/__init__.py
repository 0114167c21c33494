"""Jitted sampling: prefill + decode over a preallocated KV cache."""
