"""Qwen2.5-VL input processing: images -> patches, chat template, tokenizer, batched processor."""

from imagent_jax.processing.chat import apply_chat_template, expand_image_placeholders
from imagent_jax.processing.images import (num_image_tokens, preprocess_image, preprocess_images,
                                          smart_resize, to_rgb)
from imagent_jax.processing.processor import Processor
from imagent_jax.processing.tokenizer import Tokenizer, build_tiny_tokenizer, load_tokenizer

__all__ = [
    "Processor",
    "Tokenizer",
    "apply_chat_template",
    "build_tiny_tokenizer",
    "expand_image_placeholders",
    "load_tokenizer",
    "num_image_tokens",
    "preprocess_image",
    "preprocess_images",
    "smart_resize",
    "to_rgb",
]
