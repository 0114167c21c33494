"""The warmup stage: a reused base must have been trained with the config's recipe; config checks."""

import json
import os

import pytest

from imagent_jax.config import schema
from imagent_jax.stages import build, warmup


def test_warmup_zoom_request_share_is_validated():
  config = schema.get_config("smoke")
  config.warmup.zoom_request_share = 1.5
  with pytest.raises(ValueError, match="zoom_request_share"):
    schema.validate(config)


def test_warmup_refuses_a_base_trained_with_another_recipe(tmp_path, capsys):
  from imagent_jax.reporting import MetricsWriter, Report
  config = schema.get_config("smoke")
  base = build.base_dir(str(tmp_path))
  os.makedirs(base)
  open(os.path.join(base, "config.json"), "w").write("{}")
  args = (config, str(tmp_path), Report(str(tmp_path), "t"), MetricsWriter(str(tmp_path)))
  assert warmup.run(*args) == {"reused": True}  # no recipe file: an older base, reused unchecked
  assert "cannot be checked" in capsys.readouterr().out
  with open(os.path.join(base, warmup.RECIPE_FILE), "w") as f:
    json.dump(warmup.recipe(config), f)
  assert warmup.run(*args) == {"reused": True}
  config.warmup.zoom_request_share = 0.5
  config.data.categories = "color"
  with pytest.raises(ValueError, match=r"invalid config: .*data.categories: base 'mosaic', config 'color'; "
                                       r"warmup.zoom_request_share: base 1.0, config 0.5"):
    warmup.run(*args)
  config.warmup.progress_bar, config.data.data_dir = False, "/elsewhere"  # not part of the recipe
  config.warmup.zoom_request_share, config.data.categories = 1.0, "mosaic"
  assert warmup.run(*args) == {"reused": True}
  recipe = json.load(open(os.path.join(base, warmup.RECIPE_FILE)))
  assert "listed" not in recipe["tools"]  # the default lists the enabled tools: bases older than the key match
  config.tools.listed = "reflect"  # another system prompt: another recipe
  with pytest.raises(ValueError, match=r"tools.listed: base '\(unset\)', config 'reflect'"):
    warmup.run(*args)


def test_the_prompt_lists_tools_listed_while_only_enabled_ones_run():
  config = schema.get_config("smoke")
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["reflect", "confirm"]
  config.tools.names = "confirm"
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["confirm"]
  config.tools.listed = "all"  # the ablation: the base's prompt, one tool that works
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["reflect", "confirm"]
  assert build.tool_config(config).enabled() == ("confirm",)
  schema.validate(config)
  config.tools.listed = "zoom"
  with pytest.raises(ValueError, match="unknown tool"):
    schema.validate(config)
