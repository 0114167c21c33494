"""experiments/run_cpu_claim.py: the results it collects from finished runs (fabricated here)."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "run_cpu_claim.py")


@pytest.fixture
def claim(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("run_cpu_claim", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(module, "RESULTS", str(tmp_path / "results"))
  monkeypatch.setattr(module, "RECORDS", str(tmp_path / "results" / "cpu_claim_runs"))
  return module


def _write(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _run(root, variant, seed, final_accuracy, calls, seconds, done=True, base_accuracy=0.25):
  wd = os.path.join(root, variant, f"seed{seed}")
  base = {"step": 0, "stage": "test", "test/accuracy": base_accuracy, "test/tool_calls_per_trajectory": 0.0}
  steps = [{"step": s, "stage": "rl", "time": 100.0 + s, "reward": 0.1 * s, "tool_calls_per_trajectory": calls,
            "confirm_on_target": float("nan")} for s in (1, 2, 3)]
  final = {"step": 3, "stage": "test", "test/accuracy": final_accuracy, "test/tool_calls_per_trajectory": calls,
           "test/confirm_on_target": 0.5}
  _write(os.path.join(wd, "metrics.jsonl"), [base, *steps, {"step": 3, "stage": "eval", "eval/accuracy": 0.5}, final])
  if done:
    with open(os.path.join(wd, "claim_done.json"), "w") as f:
      json.dump({"seconds": seconds}, f)


def test_collect_means_seeds_and_walls(claim, tmp_path):
  root = str(tmp_path / "runs")
  _write(os.path.join(root, "base_run", "metrics.jsonl"),
         [{"step": 0, "stage": "warmup", "time": 1.0}, {"step": 9, "stage": "warmup", "time": 5.0},  # interrupted
          {"step": 0, "stage": "warmup", "time": 10.0}, {"step": 9, "stage": "warmup", "time": 70.0},
          {"step": 10, "stage": "warmup_probe", "time": 75.0}])
  _run(root, "rl", 0, 0.5, 1.0, 100.0)
  _run(root, "rl", 1, 0.75, 0.5, 300.0)
  _run(root, "rl", 2, 0.0, 0.0, 1.0, done=False)  # interrupted: not counted
  _run(root, "no_tools", 0, 0.25, 0.0, 200.0, base_accuracy=0.125)  # its own base figure

  variants = ["rl", "no_tools", "confirm_only"]
  out = claim.collect(root, variants, [0, 1, 2])
  assert out["base"]["accuracy"] == 0.25 and out["base"]["tool_calls_per_trajectory"] == 0.0
  assert out["rl"]["seeds"] == 2
  assert out["rl"]["accuracy"]["per_seed"] == [0.5, 0.75]
  assert out["rl"]["accuracy"]["mean"] == pytest.approx(0.625)
  assert out["rl"]["accuracy"]["std"] == pytest.approx(0.125 * 2 ** 0.5)  # sample std (n - 1)
  assert out["rl"]["tool_calls_per_trajectory"]["mean"] == pytest.approx(0.75)
  assert out["ablations"]["no_tools"]["seeds"] == 1 and out["ablations"]["no_tools"]["accuracy"]["mean"] == 0.25
  assert out["ablations"]["confirm_only"]["seeds"] == 0 and out["ablations"]["confirm_only"]["accuracy"]["mean"] is None
  walls = out["wall_s"]
  assert walls["warmup_process"] is None  # no claim_done.json in base_run
  assert walls["warmup_steps"] == pytest.approx(60.0) and walls["warmup_probe"] == pytest.approx(5.0)
  assert walls["rl_run"]["mean"] == pytest.approx(200.0)

  claim.write_outputs(out, root, variants, [0, 1, 2])
  results = tmp_path / "results"
  assert json.load(open(results / "cpu_claim.json"))["rl"]["accuracy"]["mean"] == pytest.approx(0.625)
  table = (results / "cpu_claim.md").read_text()
  assert out["rl"]["base"]["accuracy"]["per_seed"] == [0.25, 0.25]
  assert "| rl | 2 | 0.250 ± 0.000 | 0.625 ± 0.177 |" in table
  assert "| no_tools | 1 | 0.125 (one seed) | 0.250 (one seed) |" in table
  assert "| confirm_only | 0 | - | - |" in table
  assert "warmup - as a process (60 s of training steps, 5 s of probes)" in table
  assert out["code_versions"] == ["unrecorded"] and "versions of the code" not in table
  for seed, code in ((0, "a" * 64), (1, "b" * 64)):  # an edit between two runs of a sweep
    with open(os.path.join(root, "rl", f"seed{seed}", "claim_done.json"), "w") as f:
      json.dump({"seconds": 1.0, "code_sha256": code}, f)
  out = claim.collect(root, variants, [0, 1, 2])
  assert out["code_versions"] == ["a" * 64, "b" * 64, "unrecorded"]
  claim.write_outputs(out, root, variants, [0, 1, 2])
  assert "The runs were made with 3 versions of the code" in (results / "cpu_claim.md").read_text()
  assert (results / "cpu_claim_curves.png").stat().st_size > 10_000


def _base_run(root, recipe):
  base = os.path.join(root, "base_run", "base")
  os.makedirs(base)
  with open(os.path.join(base, "config.json"), "w") as f:
    json.dump({}, f)
  with open(os.path.join(base, "warmup_recipe.json"), "w") as f:
    json.dump(recipe, f)


def test_sweep_reuses_a_base_only_with_the_same_recipe(claim, tmp_path, monkeypatch):
  from imagent_jax.stages import warmup
  launched = []
  monkeypatch.setattr(claim, "_main", lambda workdir, overrides, log: launched.append(overrides) or 1.0)
  assert claim.resolved_config(["warmup.steps=7"]).warmup.steps == 7  # parsed as imagent_jax.main does
  same = tmp_path / "same"
  _base_run(same, warmup.recipe(claim.resolved_config(["warmup.steps=7"])))
  claim.run_sweep(str(same), ["rl"], [0], ["warmup.steps=7"])
  assert len(launched) == 1 and "stages=rl" in launched[0]  # the warmup was not run again
  other = tmp_path / "other"
  _base_run(other, warmup.recipe(claim.resolved_config([])))
  with pytest.raises(SystemExit, match=r"warmup.steps: base 450, config 7"):
    claim.run_sweep(str(other), ["rl"], [0], ["warmup.steps=7"])
  assert len(launched) == 1


def test_sweep_records_each_runs_overrides_and_refuses_stale_runs(claim, tmp_path, monkeypatch):
  from imagent_jax.stages import warmup
  launched = []
  monkeypatch.setattr(claim, "_main", lambda workdir, overrides, log: launched.append(overrides) or 2.0)
  root = tmp_path / "root"
  _base_run(root, warmup.recipe(claim.resolved_config([])))
  claim.run_sweep(str(root), ["confirm_only"], [0], [])
  done = json.load(open(root / "confirm_only" / "seed0" / "claim_done.json"))
  assert done == {"seconds": 2.0, "overrides": ["tools.names=confirm", "tools.listed=all"],
                  "code_sha256": claim.code_digest()}
  assert launched[0][-2:] == done["overrides"]
  claim.run_sweep(str(root), ["confirm_only"], [0], [])  # finished with these overrides: skipped
  assert len(launched) == 1
  monkeypatch.setitem(claim.VARIANTS, "confirm_only", ["tools.names=confirm"])  # the variant changed since
  with pytest.raises(SystemExit, match="other overrides"):
    claim.run_sweep(str(root), ["confirm_only"], [0], [])
  assert len(launched) == 1


def _weights(root, content: bytes):
  os.makedirs(os.path.join(root, "base_run", "base"), exist_ok=True)
  with open(os.path.join(root, "base_run", "base", "model.safetensors"), "wb") as f:
    f.write(content)


def test_recorded_runs_go_on_in_a_new_root_only_from_the_same_base(claim, tmp_path, monkeypatch):
  first = str(tmp_path / "first")
  _weights(first, b"weights")
  _run(first, "rl", 0, 0.5, 1.0, 100.0)
  _run(first, "rl", 1, 0.75, 0.5, 300.0, done=False)  # not finished: not recorded
  claim.record_finished(first, ["rl"], [0, 1])
  records = tmp_path / "results" / "cpu_claim_runs"
  assert sorted(os.listdir(records)) == ["rl_seed0.json"]
  rec = json.load(open(records / "rl_seed0.json"))
  assert rec["base_sha256"] == claim.base_digest(os.path.join(first, "base_run")) is not None
  assert [r["stage"] for r in rec["records"]] == ["test", "rl", "rl", "rl", "eval", "test"]
  assert "confirm_on_target" not in rec["records"][1]  # an rl step keeps only what the curves draw
  assert rec["records"][1]["tool_calls_per_trajectory"] == 1.0

  # A new checkout: the root is gone, the base is trained again with the same weights.
  second = str(tmp_path / "second")
  _weights(second, b"weights")
  assert claim.restore_recorded(second, ["rl"], [0, 1]) == ["rl/seed0"]
  done = json.load(open(os.path.join(second, "rl", "seed0", "claim_done.json")))
  assert done["seconds"] == 100.0 and done["restored_from"].endswith("rl_seed0.json")
  assert claim.collect(second, ["rl"], [0, 1])["rl"]["accuracy"]["per_seed"] == [0.5]
  launched = []
  monkeypatch.setattr(claim, "_main", lambda workdir, overrides, log: launched.append(workdir) or 1.0)
  monkeypatch.setattr(claim, "check_base", lambda base_run, common: None)
  with open(os.path.join(second, "base_run", "base", "config.json"), "w") as f:
    f.write("{}")
  claim.run_sweep(second, ["rl"], [0, 1], [], restore=True)
  assert launched == [os.path.join(second, "rl", "seed1")]  # the restored run is not run again
  claim.record_finished(second, ["rl"], [0, 1])
  assert "restored_from" not in json.load(open(records / "rl_seed0.json"))["claim_done"]  # not re-recorded

  other = str(tmp_path / "other")
  _weights(other, b"other weights")
  with pytest.raises(SystemExit, match="other weights"):
    claim.restore_recorded(other, ["rl"], [0])
  assert not os.path.exists(os.path.join(other, "rl"))
