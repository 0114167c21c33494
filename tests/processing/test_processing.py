"""Tests for imagent_jax.processing: images, chat template, tokenizer and processor vs transformers."""

import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl_pil

from imagent_jax.models import presets
from imagent_jax.processing import (Processor, apply_chat_template, build_tiny_tokenizer,
                                    expand_image_placeholders, load_tokenizer, num_image_tokens,
                                    preprocess_image, preprocess_images, smart_resize, to_rgb)

# A small max_pixels keeps transformers' (slow, numpy) side of every comparison fast.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64


def _random_image(width, height, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  return image if mode == "RGB" else image.convert(mode)


def _hf_image_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
  # The PIL backend is what `Qwen2VLImageProcessor` resolves to without torchvision; naming it keeps
  # the comparison on Pillow's BICUBIC when torchvision happens to be installed.
  return hf_qwen2_vl_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def _hf_preprocess(images, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = _hf_image_processor(**kwargs)(images=images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_tok")
  return build_tiny_tokenizer(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


class _ProcessorWithoutVideo(Qwen2_5_VLProcessor):
  """transformers' processor minus its video processor, which needs torchvision (not installed)."""

  def check_argument_for_proper_class(self, argument_name, argument):
    return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf_processor(tiny_folder):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      return AutoProcessor.from_pretrained(tiny_folder)
    except ImportError:  # Qwen2VLVideoProcessor requires torchvision; the rest is the same processor.
      with open(os.path.join(tiny_folder, "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
      return _ProcessorWithoutVideo(image_processor=AutoImageProcessor.from_pretrained(tiny_folder),
                                    tokenizer=AutoTokenizer.from_pretrained(tiny_folder),
                                    chat_template=template)


# ----------------------------------------------------------------------------------------- images


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000),
       min_pixels=st.sampled_from([56 * 56, 112 * 112, 256 * 28 * 28]),
       max_pixels=st.sampled_from([28 * 28 * 4, 28 * 28 * 64, 28 * 28 * 1280, 12845056]))
def test_smart_resize_matches_transformers(height, width, min_pixels, max_pixels):
  kwargs = dict(factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
  try:
    expected = hf_qwen2_vl_pil.smart_resize(height, width, **kwargs)
  except ValueError:
    with pytest.raises(ValueError, match="aspect ratio"):
      smart_resize(height, width, **kwargs)
    return
  assert smart_resize(height, width, **kwargs) == expected


@pytest.mark.parametrize("width,height,max_pixels", [
    (10, 10, MAX_PIXELS),  # tiny: grows to min_pixels
    (1000, 60, MAX_PIXELS),  # very wide
    (60, 1000, MAX_PIXELS),  # very tall
    (224, 224, MAX_PIXELS),  # square
    (333, 517, MAX_PIXELS),  # odd sizes
    (2000, 1500, MAX_PIXELS),  # above max_pixels: shrinks
    (150, 1, MAX_PIXELS),  # one pixel high, ratio 150:1
    (517, 333, 28 * 28 * 1280),  # the default budget
])
def test_pixel_values_match_transformers(width, height, max_pixels):
  image = _random_image(width, height, seed=width * 7 + height)
  expected_pixels, expected_grid = _hf_preprocess([image], max_pixels=max_pixels)
  pixel_values, grid_thw = preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=max_pixels)
  assert pixel_values.dtype == np.float32 and pixel_values.shape[1] == 3 * 2 * 14 * 14
  np.testing.assert_array_equal(grid_thw, expected_grid[0])
  np.testing.assert_allclose(pixel_values, expected_pixels, rtol=0, atol=1e-6)
  assert grid_thw[1] * grid_thw[2] * 14 * 14 <= max_pixels


def test_preprocess_images_concatenates_in_order():
  images = [_random_image(w, h, seed=i) for i, (w, h) in enumerate([(90, 60), (40, 300), (64, 64)])]
  expected_pixels, expected_grid = _hf_preprocess(images)
  pixel_values, grid_thw = preprocess_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  np.testing.assert_array_equal(grid_thw, expected_grid)
  np.testing.assert_allclose(pixel_values, expected_pixels, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(num_image_tokens(grid_thw), np.prod(expected_grid, axis=1) // 4)
  assert num_image_tokens(grid_thw[0]) == int(np.prod(expected_grid[0])) // 4


def test_patch_layout_groups_merge_blocks():
  # A 56x56 image is one 2x2 merge block: rows 0..3 are its patches in row-major order, each row
  # [C, T, 14, 14] with both time steps equal.
  pixels = np.arange(56 * 56 * 3, dtype=np.int64).reshape(56, 56, 3) % 251
  pixel_values, grid_thw = preprocess_image(pixels.astype(np.uint8), min_pixels=56 * 56, max_pixels=56 * 56)
  assert list(grid_thw) == [1, 4, 4]
  patches = pixel_values.reshape(16, 3, 2, 14, 14)
  np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])
  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  normalised = ((pixels.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)
  # Patch row 1 is the second patch of the first merge block: rows 0..13, columns 14..27.
  np.testing.assert_allclose(patches[1, :, 0], normalised[:, 0:14, 14:28], atol=1e-5)
  # Patch row 2 is the block's bottom-left patch: rows 14..27, columns 0..13.
  np.testing.assert_allclose(patches[2, :, 0], normalised[:, 14:28, 0:14], atol=1e-5)
  # Patch row 4 starts the second merge block (top row, columns 28..41).
  np.testing.assert_allclose(patches[4, :, 0], normalised[:, 0:14, 28:42], atol=1e-5)


def _mode_images():
  base = _random_image(37, 29, seed=3)
  rng = np.random.default_rng(4)
  rgba = np.concatenate([np.asarray(base), rng.integers(0, 256, (29, 37, 1), dtype=np.uint8)], axis=2)
  rgba_image = Image.fromarray(rgba, mode="RGBA")
  palette_transparent = base.convert("P")
  palette_transparent.info["transparency"] = 7
  return {
      "L": base.convert("L"),
      "LA": rgba_image.convert("LA"),
      "P": base.convert("P"),
      "P+transparency": palette_transparent,
      "PA": rgba_image.convert("PA"),
      "RGBA": rgba_image,
      "RGBa": rgba_image.convert("RGBa"),
      "CMYK": base.convert("CMYK"),
      "1": base.convert("1"),
      "YCbCr": base.convert("YCbCr"),
      "HSV": base.convert("HSV"),
      "I (8-bit values)": base.convert("L").convert("I"),
  }


@pytest.mark.parametrize("name", list(_mode_images()))
def test_rgb_conversion_matches_transformers(name):
  image = _mode_images()[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    expected = hf_convert_to_rgb(image, return_numpy=True)
  np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)
  expected_pixels, expected_grid = _hf_preprocess([image])
  pixel_values, grid_thw = preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  np.testing.assert_array_equal(grid_thw, expected_grid[0])
  np.testing.assert_allclose(pixel_values, expected_pixels, rtol=0, atol=1e-6)


def test_alpha_is_composited_onto_white():
  transparent = Image.new("RGBA", (30, 30), (10, 20, 30, 0))
  half = Image.new("LA", (30, 30), (0, 128))
  np.testing.assert_array_equal(np.asarray(to_rgb(transparent)), 255)
  assert np.all(np.abs(np.asarray(to_rgb(half)).astype(int) - 127) <= 1)


def test_sixteen_bit_and_float_modes_keep_their_content():
  values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
  sixteen = Image.fromarray(values)
  assert sixteen.mode == "I;16"
  expected = np.round(values / 257).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(to_rgb(sixteen)), np.repeat(expected[:, :, None], 3, axis=2))
  # Pillow opens some 16-bit PNGs as mode I: values above 255 are read as 16-bit, too.
  np.testing.assert_array_equal(np.asarray(to_rgb(sixteen.convert("I")))[..., 0], expected)
  unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
  np.testing.assert_array_equal(np.asarray(to_rgb(unit_float))[0, :, 1], [0, 128, 255])
  wide_float = Image.fromarray(np.array([[-3.0, 100.4, 300.0, np.nan]], np.float32))
  np.testing.assert_array_equal(np.asarray(to_rgb(wide_float))[0, :, 2], [0, 100, 255, 0])
  premultiplied_grey = Image.new("LA", (4, 4), (0, 0)).convert("La")
  np.testing.assert_array_equal(np.asarray(to_rgb(premultiplied_grey)), 255)
  pixel_values, grid_thw = preprocess_image(sixteen.resize((64, 64)))
  assert np.isfinite(pixel_values).all() and list(grid_thw) == [1, 4, 4]


def test_numpy_arrays_match_transformers():
  rgb = np.asarray(_random_image(70, 50, seed=5))
  rgba = np.concatenate([rgb, np.full((50, 70, 1), 100, np.uint8)], axis=2)
  for array in (rgb, rgba):
    expected_pixels, expected_grid = _hf_preprocess([array])
    pixel_values, grid_thw = preprocess_image(array, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(grid_thw, expected_grid[0])
    np.testing.assert_allclose(pixel_values, expected_pixels, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(preprocess_image(rgb)[0], preprocess_image(Image.fromarray(rgb))[0])
  with pytest.raises(ValueError, match="uint8"):
    preprocess_image(rgb.astype(np.float32))
  with pytest.raises(ValueError, match="channels-last"):
    preprocess_image(np.zeros((5, 6, 2), np.uint8))


@pytest.mark.parametrize("image", [Image.new("RGB", (0, 10)), Image.new("L", (10, 0)),
                                   np.zeros((0, 5, 3), np.uint8)], ids=["no-width", "no-height", "numpy"])
def test_zero_pixel_image_raises_clear_error(image):
  with pytest.raises(ValueError, match="zero pixels"):
    preprocess_image(image)
  with pytest.raises(ValueError, match=r"image 1: .*zero pixels"):
    preprocess_images([Image.new("RGB", (28, 28)), image])


def test_extreme_aspect_ratio_raises_like_transformers():
  image = Image.new("RGB", (2010, 10))
  with pytest.raises(ValueError, match="aspect ratio"):
    preprocess_image(image)
  with pytest.raises(ValueError):
    _hf_preprocess([image])


def test_200_megapixel_image_is_resized_within_budget():
  image = Image.new("RGB", (20000, 10000), (255, 0, 0))
  start = time.perf_counter()
  pixel_values, grid_thw = preprocess_image(image)
  elapsed = time.perf_counter() - start
  height, width = smart_resize(10000, 20000)
  assert list(grid_thw) == [1, height // 14, width // 14]
  assert height * width <= 28 * 28 * 1280
  assert pixel_values.shape == (height * width // 196, 1176)
  # A uniform red image stays uniform: every patch value is the normalised red/zero of its channel.
  red = (1.0 - 0.48145466) / 0.26862954
  np.testing.assert_allclose(pixel_values.reshape(-1, 3, 392)[:, 0], red, atol=1e-5)
  assert elapsed < 30, f"took {elapsed:.1f}s"


# ----------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_special_ids_match_tiny_preset(tiny_folder):
  tokenizer = load_tokenizer(tiny_folder)
  config = presets.tiny(vocab_size=512)
  assert tokenizer.vocab_size == config.vocab_size == 512
  assert tokenizer.pad_id == config.pad_token_id == tokenizer.token_to_id("<|endoftext|>")
  assert config.bos_token_id == tokenizer.token_to_id("<|endoftext|>")
  assert tokenizer.eos_id == config.eos_token_id == tokenizer.token_to_id("<|im_end|>")
  assert tokenizer.token_to_id("<|im_start|>") == 512 - 8
  assert tokenizer.token_to_id("<|vision_start|>") == config.vision_start_token_id
  assert tokenizer.token_to_id("<|vision_end|>") == config.vision_end_token_id
  assert tokenizer.token_to_id("<|vision_pad|>") == config.vision_token_id
  assert tokenizer.token_to_id("<|image_pad|>") == config.image_token_id
  assert tokenizer.token_to_id("<|video_pad|>") == config.video_token_id
  assert tokenizer.token_to_id("<tool_call>") == 510 and tokenizer.token_to_id("</tool_call>") == 511


def test_tiny_tokenizer_is_deterministic(tmp_path):
  first, second = build_tiny_tokenizer(tmp_path / "a"), build_tiny_tokenizer(tmp_path / "b")
  for name in sorted(os.listdir(first)):
    with open(os.path.join(first, name), "rb") as f1, open(os.path.join(second, name), "rb") as f2:
      assert f1.read() == f2.read(), name
  big = load_tokenizer(build_tiny_tokenizer(tmp_path / "big", vocab_size=1024))
  assert big.vocab_size == 1024 and big.pad_id == 1014 and big.token_to_id("</tool_call>") == 1023
  with pytest.raises(ValueError, match="vocab_size"):
    build_tiny_tokenizer(tmp_path / "small", vocab_size=200)


TEXTS = [
    "",
    "Think step by step, then answer.",
    '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is 1234?<|im_end|>\n',
    '<tool_call>{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [10, 20, 110, 220]}}</tool_call>',
    "  leading spaces\n\n\ttabs and ünïcödé 😀 café\r\nend",
    "<|endoftext|><|endoftext|>glued<|im_end|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(tiny_folder, text):
  tokenizer = load_tokenizer(tiny_folder)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    hf = AutoTokenizer.from_pretrained(tiny_folder)
  ids = tokenizer.encode(text)
  assert ids == hf.encode(text, add_special_tokens=False) == hf(text)["input_ids"]
  assert tokenizer.decode(ids) == text == hf.decode(ids)
  assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids_and_tool_tags_survive_skipping(tiny_folder):
  tokenizer = load_tokenizer(tiny_folder)
  ids = tokenizer.encode("<|im_start|><tool_call>x</tool_call><|im_end|>")
  assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_folder)
  assert fast.pad_token_id == tokenizer.pad_id and fast.eos_token_id == tokenizer.eos_id
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(os.path.dirname(tiny_folder))


# ------------------------------------------------------------------------------- chat template

_CONVERSATIONS = {
    "string": [{"role": "user", "content": "Hello there."}],
    "system": [{"role": "system", "content": "Be terse."},
               {"role": "user", "content": [{"type": "text", "text": "Count."}]}],
    "multi_image_turns": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "Which image shows a cat?"}]},
        {"role": "assistant", "content": '<think>zoom</think>\n<tool_call>{"name": "reflect"}</tool_call>'},
        {"role": "user", "content": [{"type": "text", "text": "View:"}, {"image": "img.png"},
                                     {"type": "image_url", "image_url": "x"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>A</answer>"}]},
    ],
    "video_and_image": [{"role": "user", "content": [{"type": "video"}, {"type": "image"},
                                                     {"type": "text", "text": "Both?"}]}],
}


@pytest.mark.parametrize("name", list(_CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_chat_template_matches_transformers(tiny_folder, name, add_generation_prompt, add_vision_id):
  messages = _CONVERSATIONS[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    hf = AutoTokenizer.from_pretrained(tiny_folder)
    expected = hf.apply_chat_template(messages, tokenize=False, add_vision_id=add_vision_id,
                                      add_generation_prompt=add_generation_prompt)
  assert apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                             add_vision_id=add_vision_id) == expected


def test_chat_template_default_system_prompt():
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
  text = apply_chat_template(messages)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="role"):
    apply_chat_template([{"content": "no role"}])


def test_expand_image_placeholders_text_and_ids(tiny_folder):
  tokenizer = load_tokenizer(tiny_folder)
  pad_id = tokenizer.token_to_id("<|image_pad|>")
  grid = np.array([[1, 4, 6], [1, 2, 2]])
  text = "a<|image_pad|>b<|image_pad|>c"
  expanded = expand_image_placeholders(text, grid)
  assert expanded == "a" + "<|image_pad|>" * 6 + "b" + "<|image_pad|>" + "c"
  expanded_ids = expand_image_placeholders(tokenizer.encode(text), grid, image_pad_id=pad_id)
  assert expanded_ids == tokenizer.encode(expanded)
  with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
    expand_image_placeholders(text, grid[:1])
  with pytest.raises(ValueError, match="placeholders"):
    expand_image_placeholders(tokenizer.encode(text), grid[:1], image_pad_id=pad_id)
  with pytest.raises(ValueError, match="image_pad_id"):
    expand_image_placeholders([1, 2], grid[:0])


# ----------------------------------------------------------------------------------- processor


def _batch():
  images = [_random_image(w, h, seed=10 + i) for i, (w, h) in enumerate([(90, 60), (333, 517), (40, 40),
                                                                          (100, 500)])]
  first = [
      {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                   {"type": "text", "text": "Compare the two images."}]},
      {"role": "assistant", "content": '<think>zoom</think><tool_call>{"name": "confirm"}</tool_call>'},
      {"role": "user", "content": [{"type": "text", "text": "Zoomed view:"}, {"type": "image"}]},
  ]
  second = [{"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
  return [first, second], images


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_processor_matches_transformers(tiny_folder, hf_processor, padding_side):
  conversations, images = _batch()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    texts = [hf_processor.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in conversations]
    expected = hf_processor(text=texts, images=images, padding=True, padding_side=padding_side,
                            return_tensors="np")
  ours = Processor.from_pretrained(tiny_folder)(conversations, images, padding_side=padding_side)
  assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
  assert ours["input_ids"].dtype == ours["attention_mask"].dtype == ours["image_grid_thw"].dtype == np.int32
  assert ours["pixel_values"].dtype == np.float32
  for key in ("input_ids", "attention_mask", "image_grid_thw"):
    np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
  np.testing.assert_allclose(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
  pad_col = 0 if padding_side == "left" else -1
  assert ours["attention_mask"][1, pad_col] == 0 and ours["input_ids"][1, pad_col] == 502
  # Same result from pre-templated strings, images given per sample, or images inside the messages.
  processor = Processor.from_pretrained(tiny_folder)
  from_texts = processor(texts, [images[:3], images[3:]], padding_side=padding_side)
  embedded = _embed_images(conversations, images)
  from_messages = processor(embedded, padding_side=padding_side)
  for key in ours:
    np.testing.assert_array_equal(from_texts[key], ours[key])
    np.testing.assert_array_equal(from_messages[key], ours[key])


def _embed_images(conversations, images):
  """Copies of ``conversations`` whose k-th image item carries ``images[k]`` under ``"image"``."""
  remaining = iter(images)

  def embed(item):
    return dict(item, image=next(remaining)) if item.get("type") == "image" else item

  return [[dict(m, content=[embed(item) for item in m["content"]]) if isinstance(m["content"], list) else m
           for m in conversation] for conversation in conversations]


def test_processor_text_only_batch(tiny_folder):
  out = Processor.from_pretrained(tiny_folder)(["short", "a longer prompt here"])
  assert set(out) == {"input_ids", "attention_mask"}
  assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][1].all()


def test_processor_rejects_placeholder_image_mismatch(tiny_folder):
  processor = Processor.from_pretrained(tiny_folder)
  conversations, images = _batch()
  with pytest.raises(ValueError, match=r"4 <\|image_pad\|> placeholders .* but 3 images"):
    processor(conversations, images[:3])
  with pytest.raises(ValueError, match=r"placeholders .* but 5 images"):
    processor(conversations, images + images[:1])
  with pytest.raises(ValueError, match=r"sample 1 has 1 .* but 2 images"):
    processor(conversations, [images[:3], images[:2]])
  with pytest.raises(ValueError, match="placeholders"):
    processor([{"role": "user", "content": [{"type": "image"}]}])  # no image anywhere


def test_processor_reads_both_preprocessor_config_forms(tiny_folder, tmp_path):
  folder = tmp_path / "newer"
  shutil.copytree(tiny_folder, folder)
  with open(folder / "preprocessor_config.json", encoding="utf-8") as f:
    config = json.load(f)
  config.pop("min_pixels")
  config.pop("max_pixels")
  config["size"] = {"shortest_edge": 1234, "longest_edge": 56789}
  with open(folder / "preprocessor_config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  settings_ = Processor.from_pretrained(folder).image_settings
  assert (settings_["min_pixels"], settings_["max_pixels"]) == (1234, 56789)
  older = Processor.from_pretrained(tiny_folder).image_settings
  assert (older["min_pixels"], older["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS)
  assert (older["patch_size"], older["merge_size"], older["temporal_patch_size"]) == (14, 2, 2)
