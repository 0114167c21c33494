"""Qwen2.5-VL image preprocessing: RGB conversion, smart resize, normalisation and patchify.

numpy + PIL only. The output equals transformers' ``Qwen2VLImageProcessor`` (its PIL backend,
``Qwen2VLImageProcessorPil``) value for value:

1. ``to_rgb``: images with an alpha band (or a palette transparency) are composited onto white,
   every other mode goes through Pillow's ``convert("RGB")``.
2. ``smart_resize`` picks a size divisible by ``patch_size * merge_size`` whose area lies in
   ``[min_pixels, max_pixels]``; Pillow resizes with ``BICUBIC``.
3. Pixels are scaled by 1/255 and normalised with the OpenAI CLIP mean and std.
4. The ``[H, W, 3]`` image becomes ``[grid_h * grid_w, 3 * T * P * P]`` patches, ordered so that
   the ``merge_size x merge_size`` patches merged into one LLM token are consecutive; a single
   image is repeated ``temporal_patch_size`` (T) times along time.

Where we differ from transformers, on purpose (transformers crashes or loses the image):

* ``I;16`` images (16-bit grey) are scaled to 8 bits (``round(v / 257)``); Pillow, and so
  transformers, clips them at 255, which turns most 16-bit images white.
* ``I`` images (32-bit int; Pillow opens some 16-bit PNGs this way) whose values all lie in
  [0, 255] are used as they are (same as transformers); otherwise they are read as 16-bit
  (clipped to [0, 65535], then ``round(v / 257)``).
* ``F`` images (32-bit float) whose finite values all lie in [0, 1] are scaled by 255; otherwise
  they are clipped to [0, 255]. Both round to nearest (Pillow truncates and maps [0, 1] to black);
  NaN becomes 0.
* ``La`` (grey with premultiplied alpha) is read as ``LA`` and composited onto white; Pillow
  cannot convert it to RGB.

Huge images (e.g. 200 megapixels) are handled exactly as transformers handles them, without its
extra full-size copies: an RGB image is resized by Pillow in place of being copied to numpy and
back. Pillow's decompression-bomb guard applies when *opening* files; callers that pass an
already-open image have accepted its size.
"""

from __future__ import annotations

import io
import math
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MAX_ASPECT_RATIO = 200

ImageLike = Union[Image.Image, np.ndarray]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """Returns the ``(height, width)`` Qwen2.5-VL resizes an image to.

  Both sides become multiples of ``factor``, the area lands in ``[min_pixels, max_pixels]`` (up to
  one ``factor`` step) and the aspect ratio is kept as closely as possible. Same arithmetic as
  transformers' ``smart_resize``, including Python's round-half-to-even.

  Args:
    height: input height in pixels, > 0.
    width: input width in pixels, > 0.
    factor: ``patch_size * merge_size``.
    min_pixels: smallest allowed area.
    max_pixels: largest allowed area.

  Returns:
    ``(resized_height, resized_width)``, both multiples of ``factor``.

  Raises:
    ValueError: a side is not positive, or the aspect ratio exceeds 200:1.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image has zero pixels (height={height}, width={width}); every image needs at least "
                     "one pixel in each direction")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ValueError(f"image aspect ratio {ratio:.1f}:1 (height={height}, width={width}) exceeds the "
                     f"{MAX_ASPECT_RATIO}:1 that Qwen2.5-VL accepts; crop or pad the image first")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
  """``[H, W]`` uint8 -> RGB image with three equal bands."""
  return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
  """RGB from ``I;16*``, ``I`` and ``F`` images, scaled to 8 bits as the module docstring says."""
  values = np.asarray(image)
  if image.mode == "F":
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
      values = values * 255.0
    return _gray_to_rgb(np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8))
  values = values.astype(np.int64)
  if image.mode == "I" and (values.size == 0 or (values.min() >= 0 and values.max() <= 255)):
    return _gray_to_rgb(values.astype(np.uint8))
  values = np.clip(values, 0, 65535)
  return _gray_to_rgb(np.round(values / 257.0).astype(np.uint8))


def _composite_on_white(image: Image.Image) -> Image.Image:
  """RGB of ``image`` drawn onto an opaque white background (alpha compositing)."""
  rgba = image.convert("RGBA")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba).convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
  """RGB image from a channels-last uint8 array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]``.

  Four channels are RGBA, blended onto white with transformers' numpy formula
  ``round(a * rgb + (1 - a) * 255)``, ``a = alpha / 255``.
  """
  if array.dtype != np.uint8:
    raise ValueError(f"numpy images must be uint8 with values 0..255, got dtype {array.dtype}; convert "
                     "floats in [0, 1] with (x * 255).round().astype(np.uint8)")
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
    raise ValueError(f"numpy images must be channels-last [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
                     f"got shape {array.shape}")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f"image has zero pixels (height={array.shape[0]}, width={array.shape[1]})")
  channels = array.shape[2]
  if channels == 1:
    array = np.repeat(array, 3, axis=2)
  elif channels == 4:
    alpha = array[:, :, 3:4] / 255
    array = np.round(alpha * array[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)
  return Image.fromarray(np.ascontiguousarray(array))


class ImageDecodeError(ValueError):
  """An encoded image that cannot be used: ``kind`` is ``empty_image``, ``corrupt_image`` or
  ``decompression_bomb``; ``message`` says what it is ("an empty file (0 bytes)", "not an image
  Pillow can read (...)"), without naming the file: callers do."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind, self.message = kind, message


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
  """Decodes an encoded image (PNG, JPEG, ...) to RGB, its EXIF orientation applied.

  The size is read from the header and checked before any pixel is decoded. A phone photo stored
  100x50 with orientation "rotate 90" becomes 50x100, as transformers' ``load_image`` shows it.

  Args:
    data: the file's bytes.
    max_pixels: most pixels allowed (None: Pillow's ``Image.MAX_IMAGE_PIXELS``; Pillow's own hard
      limit, twice that, applies as well).

  Returns:
    A mode ``"RGB"`` image.

  Raises:
    ImageDecodeError: empty, not an image Pillow reads, too many pixels, truncated or undecodable.
  """
  if not data:
    raise ImageDecodeError("empty_image", "an empty file (0 bytes)")
  limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise ImageDecodeError("decompression_bomb", str(e)) from None
  except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bad files
    raise ImageDecodeError("corrupt_image", f"not an image Pillow can read ({type(e).__name__}: {e})") from None
  width, height = image.size
  if width <= 0 or height <= 0:
    raise ImageDecodeError("empty_image", f"an image of zero pixels ({width}x{height})")
  if limit is not None and width * height > limit:
    raise ImageDecodeError("decompression_bomb", f"{width}x{height} = {width * height} pixels, more than the "
                                                 f"{limit} allowed (possible decompression bomb; raise the limit if "
                                                 "it is genuine)")
  try:
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)
  except Exception as e:  # noqa: BLE001
    raise ImageDecodeError("corrupt_image", f"an image that cannot be decoded ({type(e).__name__}: {e})") from None


def to_rgb(image: ImageLike) -> Image.Image:
  """Converts a PIL image of any mode, or a uint8 numpy array, to an RGB PIL image.

  Same pixels as transformers' ``convert_to_rgb`` for every mode it handles; 16/32-bit and float
  grey modes and ``La`` follow the rules in the module docstring. An RGB image without palette
  transparency is returned as is (not copied).

  Args:
    image: a ``PIL.Image.Image`` or a channels-last uint8 array ``[H, W(, C)]``, ``C`` in 1, 3, 4.

  Returns:
    A mode ``"RGB"`` image of the same size.

  Raises:
    ValueError: empty image, unsupported array layout or dtype, or a mode Pillow cannot convert.
  """
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image)
  if not isinstance(image, Image.Image):
    raise ValueError(f"images must be PIL images or numpy arrays, got {type(image).__name__}")
  if image.width == 0 or image.height == 0:
    raise ValueError(f"image has zero pixels (height={image.height}, width={image.width})")
  mode = image.mode
  if mode.startswith("I;16") or mode in ("I", "F"):
    return _high_depth_to_rgb(image)
  if mode == "La":
    return _composite_on_white(image.convert("LA"))
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  try:
    if has_alpha:
      return _composite_on_white(image)
    return image if mode == "RGB" else image.convert("RGB")
  except (ValueError, OSError) as e:
    raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from e


def _patchify(pixels: np.ndarray, patch_size: int, merge_size: int,
              temporal_patch_size: int) -> np.ndarray:
  """``[C, H, W]`` -> ``[(H / P) * (W / P), C * T * P * P]`` in merge-block order.

  Rows run over merge blocks (row-major over the ``H / (P * M)`` by ``W / (P * M)`` block grid),
  then over the ``M x M`` patches inside a block (row-major); each row is the patch's channels,
  time (the frame repeated ``T`` times) and pixels, flattened in that order.
  """
  channels, height, width = pixels.shape
  blocks_h, blocks_w = height // (patch_size * merge_size), width // (patch_size * merge_size)
  grid = pixels.reshape(channels, blocks_h, merge_size, patch_size, blocks_w, merge_size, patch_size)
  # -> [blocks_h, blocks_w, merge_row, merge_col, C, P_row, P_col]
  grid = grid.transpose(1, 4, 2, 5, 0, 3, 6)
  grid = np.broadcast_to(grid[:, :, :, :, :, None],
                         grid.shape[:5] + (temporal_patch_size,) + grid.shape[5:])
  num_patches = blocks_h * blocks_w * merge_size * merge_size
  return grid.reshape(num_patches, channels * temporal_patch_size * patch_size * patch_size)


def preprocess_image(image: ImageLike, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                     image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                     image_std: Sequence[float] = OPENAI_CLIP_STD) -> tuple[np.ndarray, np.ndarray]:
  """Turns one image into Qwen2.5-VL vision-tower input.

  Args:
    image: PIL image (any mode) or channels-last uint8 array.
    min_pixels: smallest area after resizing.
    max_pixels: largest area after resizing.
    patch_size: ViT patch side P.
    merge_size: side M of the patch block merged into one LLM token.
    temporal_patch_size: frames per temporal patch T; a still image is repeated T times.
    image_mean: per-channel mean subtracted after scaling to [0, 1].
    image_std: per-channel std divided by after that.

  Returns:
    ``pixel_values [grid_h * grid_w, 3 * T * P * P]`` float32 and ``grid_thw [3]`` int64
    ``(1, grid_h, grid_w)``.

  Raises:
    ValueError: zero-pixel image, aspect ratio above 200:1, or an unconvertible image.
  """
  rgb = to_rgb(image)
  height, width = smart_resize(rgb.height, rgb.width, factor=patch_size * merge_size,
                               min_pixels=min_pixels, max_pixels=max_pixels)
  # Pillow returns a copy for a same-size resize, exactly like transformers' unconditional resize.
  resized = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
  pixels = np.asarray(resized).transpose(2, 0, 1)  # [3, H, W] uint8
  # transformers: rescale in float64, cast to float32, then normalise in float32.
  pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
  std = np.asarray(image_std, dtype=np.float32)[:, None, None]
  pixels = (pixels - mean) / std
  patches = _patchify(pixels, patch_size, merge_size, temporal_patch_size)
  grid_thw = np.array([1, height // patch_size, width // patch_size], dtype=np.int64)
  return np.ascontiguousarray(patches, dtype=np.float32), grid_thw


def preprocess_images(images: Sequence[ImageLike], **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """``preprocess_image`` on each image, concatenated in order.

  Args:
    images: N images.
    **kwargs: keyword arguments of ``preprocess_image``.

  Returns:
    ``pixel_values [sum_i grid_h_i * grid_w_i, 3 * T * P * P]`` float32 and
    ``grid_thw [N, 3]`` int64. With no images: ``[0, 3 * T * P * P]`` and ``[0, 3]``.

  Raises:
    ValueError: as ``preprocess_image``, with the failing image's index in the message.
  """
  patches, grids = [], []
  for index, image in enumerate(images):
    try:
      pixel_values, grid_thw = preprocess_image(image, **kwargs)
    except ValueError as e:
      raise ValueError(f"image {index}: {e}") from e
    patches.append(pixel_values)
    grids.append(grid_thw)
  if not patches:
    return np.zeros((0, patch_dim(kwargs)), np.float32), np.zeros((0, 3), np.int64)
  return np.concatenate(patches, axis=0), np.stack(grids).astype(np.int64)


def patch_dim(settings) -> int:
  """Length of one patch row, ``3 * T * P * P``, of ``preprocess_image`` keyword arguments
  (``Processor.image_settings``; the defaults where a key is missing)."""
  p = settings.get("patch_size", PATCH_SIZE)
  return 3 * settings.get("temporal_patch_size", TEMPORAL_PATCH_SIZE) * p * p


def num_image_tokens(grid_thw, merge_size: int = MERGE_SIZE):
  """LLM tokens an image occupies: ``t * h * w // merge_size**2``.

  Args:
    grid_thw: ``[3]`` or ``[N, 3]`` ints.
    merge_size: side of the merged patch block.

  Returns:
    An int for ``[3]``, an int64 array ``[N]`` for ``[N, 3]``.
  """
  grid = np.asarray(grid_thw, dtype=np.int64)
  tokens = np.prod(grid, axis=-1) // (merge_size * merge_size)
  return int(tokens) if tokens.ndim == 0 else tokens


def pack_patches(patches: Sequence[np.ndarray], grids: Sequence[np.ndarray], *, patch_budget: int, image_slots: int,
                 patch_dim: int, what: str = "the images") -> tuple[np.ndarray, np.ndarray]:
  """Packs images' patches into static budgets: the one way every caller pads images for ``jit``.

  Args:
    patches: per image (or per group of images) ``[P_i, patch_dim]`` arrays, in placeholder order.
    grids: the matching ``[3]`` or ``[N_i, 3]`` grids.
    patch_budget: static number of patch rows of the result.
    image_slots: static number of grid rows of the result (unused slots are all-zero rows).
    patch_dim: length of one patch (``C * T * P * P``), for the empty case.
    what: names the images in the error message.

  Returns:
    ``pixel_values [patch_budget, patch_dim]`` float32 (zero rows after the real patches) and
    ``image_grid_thw [image_slots, 3]`` int32.

  Raises:
    ValueError: the images need more patches or slots than the budgets.
  """
  parts = [np.asarray(p, np.float32).reshape(-1, patch_dim) for p in patches]
  grid = np.concatenate([np.asarray(g, np.int64).reshape(-1, 3) for g in grids]) if len(grids) else (
      np.zeros((0, 3), np.int64))
  used = sum(len(p) for p in parts)
  if used > patch_budget or len(grid) > image_slots:
    raise ValueError(f"{what} need {used} patches in {len(grid)} images; the budgets are "
                     f"patch_budget={patch_budget}, image_slots={image_slots}")
  # One copy of the real patches into a zeroed buffer: the padding is never written (np.zeros'
  # pages are mapped on first touch), and callers that cut the budget (rl.batch.trim_image_budget)
  # never touch it. The budget of an RL batch is ~115 MB, most of it padding.
  pv = np.zeros((patch_budget, patch_dim), np.float32)
  if parts:
    np.concatenate(parts, out=pv[:used])
  grid = np.concatenate([grid, np.zeros((image_slots - len(grid), 3), np.int64)]).astype(np.int32)
  return pv, grid
