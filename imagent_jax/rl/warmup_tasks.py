"""The warmup's supervised tasks: what a pretrained base would know, and nothing about *when* to call.

Offline there is no pretrained VLM to start RL from, so the embedded default first trains one
(``stages.warmup``) by next-token prediction (``rl.sft``) on examples these tasks make from
synthetic questions:

* ``read_zoom``: an RL trajectory cut after its first tool call: the RL prompt, an assistant turn
  that calls ``confirm`` on the region holding the answer (or, a ``1 - confirm_share`` part of
  the time, ``reflect`` on a random image), and the tool's response turn with the returned view
  → think, then answer. Only the answer is trained: the model learns to read a returned view
  exactly where the rollout puts it, not to call.
* ``direct``: the RL prompt exactly → think, then answer. The model learns the answer format for
  the plain question; where the base view cannot show the detail this is a guess. A
  ``call_share`` part of these prompts is answered with a tool call instead (``confirm`` on the
  region it would ``locate``, or ``reflect``): the base's exploration prior. It calls as often
  where a call helps as where it does not, and it never sees that a call pays.
* ``locate``: "where is the detail this question is about?" → the image number and its box in the
  pixels the model sees. The model learns to ground, which good ``confirm`` boxes need.
* ``tool_syntax``: the RL prompt plus an explicit instruction → the tool call, alone: "Zoom in on
  the detail the question is about." (a ``zoom_request_share`` part of the time; the default 1.0
  always) → ``confirm`` on the asked image's detail, else "Call the confirm tool on image 2 with
  box [...]" or "Call the reflect tool on image 3" (a random image and box). The model learns the
  call syntax and to follow a request to zoom, naming the image the question asks about, as an
  instruction-tuned VLM would (``evaluation.probes.image_choice_probe`` measures it).

No task rewards a call or shows the answer after a call being better than without: the RL stage
must discover when calling pays and raise the call rate from the prior. A task is one function
registered in ``TASKS``; ``config.warmup.tasks`` names them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional

import numpy as np

from imagent_jax.agent import protocol, tools
from imagent_jax.data import synthetic
from imagent_jax.registry import Registry
from imagent_jax.stages import build

TaskFn = Callable[[dict, tools.ToolContext, Optional[np.random.Generator], "TaskOptions"], tuple[list, list, str]]
# fn(example, ctx, rng, options) -> (images, messages, response_text). ``messages`` are the
# conversation after the system prompt (the user turn, and for multi-turn tasks the assistant and
# tool turns before the trained response); ``rng`` is None for a deterministic variant (the probes).
TASKS: Registry[TaskFn] = Registry("warmup task")


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
  """Registers a warmup task ``fn(example, ctx, rng, options) -> (images, messages, response_text)``."""
  return TASKS.register(name)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """Warmup task knobs (``config.warmup``).

  Attributes:
    call_share: share of ``direct`` prompts answered with a tool call (the base's call prior).
    confirm_share: share of the base's calls (``direct``) and of ``read_zoom``'s calls that are
      ``confirm`` on the answer's region; the rest are ``reflect`` on a random input image.
    zoom_request_share: share of ``tool_syntax`` requests that ask to zoom on the detail the
      question is about (the call names the asked image); the rest ask, in equal parts, for
      ``reflect`` or ``confirm`` on a named random image (and box).
  """
  call_share: float = 0.0
  confirm_share: float = 1.0
  zoom_request_share: float = 1.0


ANSWER_THOUGHT = "<think>I look at the images.</think>"
VIEW_THOUGHTS = {"confirm": "<think>The zoom shows the detail.</think>",
                 "reflect": "<think>I look at the image again.</think>"}


def shown_box(example, ctx: tools.ToolContext, pad: int | None = None) -> tuple[int, list[int]]:
  """``(k, box)``: the target image's 0-based index and the target region, padded (default: by
  its category's ``zoom_pad``), in the pixels of the target image as the model sees it (the
  question's box when it has a hint: ``synthetic.DifficultyConfig.box_hint_pixels``)."""
  k = example["target_image"]
  size, shown = ctx.views[k].size, ctx.shown_sizes[k]
  if pad is None:
    return k, synthetic.zoom_box(example, size, shown)
  return k, synthetic.view_box(example["target_box"], size, shown, pad)


def user_content(example, num_images: int) -> list:
  """The user turn's content items of the RL prompt for ``example`` (``protocol.build_prompt_messages``)."""
  messages = protocol.build_prompt_messages(example["question"], num_images, example.get("options"), tools=())
  return messages[1]["content"]


def _with_instruction(content: list, text: str) -> list:
  """``content`` with ``text`` appended to its last (question) item."""
  last = dict(content[-1], text=content[-1]["text"] + "\n" + text)
  return content[:-1] + [last]


def _zoom_call(example, ctx) -> protocol.ToolCall:
  """``confirm`` on the answer's padded region (the question's box where it gives one)."""
  k, box = shown_box(example, ctx)
  return protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})


def _base_call(example, ctx, rng, options: TaskOptions) -> protocol.ToolCall:
  """A call of the base's prior: ``_zoom_call``, or ``reflect`` on a random input image; always
  the zoom when ``rng`` is None."""
  if rng is None or rng.random() < options.confirm_share:
    return _zoom_call(example, ctx)
  return protocol.ToolCall("reflect", {"image": int(rng.integers(len(example["images"]))) + 1})


@register_task("read_zoom")
def _read_zoom(example, ctx, rng, options):
  """The RL prompt, a call, its tool response with the view → answer (the rollout's exact layout)."""
  call = _base_call(example, ctx, rng, options)
  result = tools.run_tool_call(ctx, call)
  n = len(example["images"])
  messages = [{"role": "user", "content": user_content(example, n)},
              {"role": "assistant", "content": ANSWER_THOUGHT + protocol.render_tool_call(call)},
              protocol.tool_response_message(result.text, result.image is not None)]
  response = f"{VIEW_THOUGHTS[call.name]}<answer>{example['answer']}</answer>"
  view = [result.image] if result.image is not None else []  # a refused call (tools disabled) returns none
  return list(example["images"]) + view, messages, response


@register_task("direct")
def _direct(example, ctx, rng, options):
  """The RL prompt exactly, answered without tools (the answer format, and a guess where the base
  view cannot show the detail), or a ``call_share`` part of the time with the base's call."""
  images = list(example["images"])
  messages = [{"role": "user", "content": user_content(example, len(images))}]
  if rng is not None and rng.random() < options.call_share:
    return images, messages, ANSWER_THOUGHT + protocol.render_tool_call(_base_call(example, ctx, rng, options))
  return images, messages, f"{ANSWER_THOUGHT}<answer>{example['answer']}</answer>"


@register_task("locate")
def _locate(example, ctx, rng, options):
  """Where the detail is: the image number and the box, in the pixels the model sees."""
  k, box = shown_box(example, ctx, pad=0)
  images = list(example["images"])
  content = user_content(dict(example, options=None), len(images))
  content = _with_instruction(content, "Which image holds the detail this is about, and where? Give the image "
                                       "number and the box [x0, y0, x1, y1] in its pixels.")
  response = f"<think>The detail is small.</think><answer>image {k + 1} {json.dumps(box)}</answer>"
  return images, [{"role": "user", "content": content}], response


@register_task("tool_syntax")
def _tool_syntax(example, ctx, rng, options):
  """The RL prompt plus an explicit instruction to call a tool → the call, alone.

  A ``zoom_request_share`` part of the time (by default always) "Zoom in on the detail the
  question is about." (``confirm`` on the answer's region: the question's box where it gives
  one); otherwise a named tool on a random image (and box).
  """
  n = len(example["images"])
  k = int(rng.integers(n))
  draw, zoom = rng.random(), options.zoom_request_share
  if draw < zoom:
    call = _zoom_call(example, ctx)
    text = "Zoom in on the detail the question is about."
  elif draw < (1 + zoom) / 2:  # the rest: half reflect, half confirm
    call = protocol.ToolCall("reflect", {"image": k + 1})
    text = f"Call the reflect tool on image {k + 1}."
  else:
    w, h = ctx.shown_sizes[k]
    x0, y0 = int(rng.integers(0, max(1, w - 28))), int(rng.integers(0, max(1, h - 28)))
    box = [x0, y0, min(w, x0 + int(rng.integers(28, 96))), min(h, y0 + int(rng.integers(28, 96)))]
    call = protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})
    text = f"Call the confirm tool on image {k + 1} with box {json.dumps(box)}."
  response = f"<think>As asked.</think>{protocol.render_tool_call(call)}"
  content = _with_instruction(user_content(example, n), text)
  return list(example["images"]), [{"role": "user", "content": content}], response


def task_options(config) -> TaskOptions:
  """``TaskOptions`` from ``config.warmup``."""
  w = config.warmup
  return TaskOptions(call_share=float(w.call_share), confirm_share=float(w.confirm_share),
                     zoom_request_share=float(w.zoom_request_share))


def make_example(config, index: int, tool_config: tools.ToolConfig, system: str):
  """Warmup example ``index``, deterministic in ``(config.seed, config.data.seed, index)``.

  The tasks of ``config.warmup.tasks`` are cycled in order; the question comes from its own
  synthetic seed stream, so the warmup never sees the RL or evaluation questions.

  Returns:
    ``(messages, images, response, task)``: the conversation (system prompt first), its images,
    the trained response text and the task's name.
  """
  rng = np.random.default_rng([config.seed, 7, index])
  w = config.warmup
  source = synthetic.generate_example(config.data.seed + 7919, index, build.difficulty(config))
  names = [t.strip() for t in w.tasks.split(",")]
  task = names[index % len(names)]
  ctx = tools.ToolContext(source["images"], tool_config)
  images, turns, response = TASKS[task](source, ctx, rng, task_options(config))
  return [{"role": "system", "content": system}] + turns, images, response, task
