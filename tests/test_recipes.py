"""Recipe files: `python -m llmft train|dpo recipe.yaml` runs the whole path; names are checked before loading."""
import json
from pathlib import Path

import pytest

from llmft import recipes
from llmft.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_sft_recipe_runs_end_to_end_in_smoke_mode(tmp_path):
    recipe = recipes.load_recipe(REPO / "recipes" / "01_sft.yaml", smoke=True)
    recipe["training"]["output_dir"] = str(tmp_path / "sft")
    summary = recipes.run_recipe(recipe, "train", smoke=False)  # already resolved
    out = tmp_path / "sft"
    assert summary["global_step"] == 20
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and any(",eval," in row for row in rows)
    assert "eval_probe/fibonacci" in rows[0].split(",")  # the recipe's live probe, named in YAML
    best = json.loads((out / "best" / "best.json").read_text())
    assert (Path(best["best_path"]) / "adapter_model.safetensors").exists()
    saved = json.loads((out / "llmft_config.json").read_text())
    assert saved["options"]["learning_rate"] == 5e-3 and saved["options"]["max_steps"] == 20
    assert json.loads((out / "recipe.json").read_text())["model"]["chat_template"] == "chatml"
    assert (out / "adapters" / "adapter_config.json").exists() and (out / "training.png").exists()


def test_dpo_recipe_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the smoke section writes to outputs/02_dpo_smoke
    assert main(["dpo", str(REPO / "recipes" / "02_dpo.yaml"), "--smoke"]) == 0
    out = tmp_path / "outputs" / "02_dpo_smoke"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] >= 1 and summary["best"]["metric"] == "eval_rewards/accuracies"
    assert json.loads((out / "llmft_config.json").read_text())["options"]["beta"] == 0.1


@pytest.mark.parametrize("section,bad,good", [("training", "learning_rte", "learning_rate"),
                                              ("model", "lora_rank", "lora_r"), ("data", "eval_row", "eval_rows")])
def test_misspelt_field_fails_with_the_suggestion(tmp_path, capsys, section, bad, good):
    text = (REPO / "recipes" / "01_sft.yaml").read_text().replace(f"\n{section}:\n", f"\n{section}:\n  {bad}: 1\n", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert f"[{section}]: unknown option(s) '{bad}' (did you mean '{good}'?)" in err and str(path) in err
    with pytest.raises(TypeError, match=rf"did you mean '{good}'"):
        recipes.run_recipe(path, "train", smoke=True)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: testing:tiny_model}\ntraning: {max_steps: 1}\n")
    with pytest.raises(TypeError, match=r"'traning' \(did you mean 'training'\?\)"):
        recipes.load_recipe(path)
