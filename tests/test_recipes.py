"""Recipe files: `python -m llmft train|dpo recipe.yaml` runs the whole path; names are checked before loading."""
import json
import re
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


def _recipe_file(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, where, problem", [
    ("model:\n\tname: testing:tiny_model\n", ":2:1:", "YAML indents with spaces, never tabs"),
    ("model: {name: testing:tiny_model\ndata: {}\n", ":2:", "YAML syntax error"),
    ("training:\n  max_steps: 1\n learning_rate: 1\n", ":3:", "YAML syntax error"),
])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys, text, where, problem):
    path = _recipe_file(tmp_path, text)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}{where}") and problem in err
    with pytest.raises(ValueError, match=problem):
        recipes.load_recipe(path)


def test_a_typo_in_the_smoke_section_is_refused_without_smoke(tmp_path, capsys):
    text = (REPO / "recipes" / "01_sft.yaml").read_text().replace("learning_rate: 5.0e-3", "learning_rte: 5.0e-3")
    path = _recipe_file(tmp_path, text)
    assert main(["train", str(path)]) == 2  # no --smoke: the section is not applied, and checked all the same
    assert "[smoke] [training]: unknown option(s) 'learning_rte' (did you mean 'learning_rate'?)" in \
        capsys.readouterr().err
    assert "smoke" not in recipes.load_recipe(path, smoke=True)  # applied: nothing left over


@pytest.mark.parametrize("section, line, message", [
    ("training", "learning_rate: abc", r"\[training\]: learning_rate='abc': not a number"),
    ("training", "max_steps: -5", r"\[training\]: max_steps=-5: .*-1 to train for num_train_epochs"),
    ("training", "per_device_train_batch_size: 0", r"per_device_train_batch_size=0: must be at least 1"),
    ("data", "split: nosuchsplit", r"\[data\]: data.split='nosuchsplit': testing:finetome has only the split\(s\) "
                                   r"\['train'\]"),
    ("data", "dataset: testing:finetom", r"data.dataset='testing:finetom': .*did you mean 'testing:finetome'"),
])
def test_bad_values_fail_before_anything_loads(tmp_path, capsys, monkeypatch, section, line, message):
    sections = {"data": "dataset: testing:finetome, format: sharegpt", "training": "output_dir: out, max_steps: 2"}
    sections[section] += ", " + line
    path = _recipe_file(tmp_path, "model: {name: testing:tiny_model}\n"
                        + "".join(f"{name}: {{{fields}}}\n" for name, fields in sections.items()))
    assert main(["train", str(path)]) == 2
    assert re.search(message, capsys.readouterr().err)
    import llmft

    monkeypatch.setattr(llmft, "load_model", _must_not_load)
    with pytest.raises(ValueError, match=message):
        recipes.run_recipe(path, "train", smoke=False)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was found")


def test_output_dir_that_is_a_file_fails_before_loading(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").write_text("not a directory")
    path = _recipe_file(tmp_path, "model: {name: testing:tiny_model}\ndata: {dataset: testing:finetome, format: "
                                  f"sharegpt}}\ntraining: {{output_dir: {tmp_path / 'out'}, max_steps: 2}}\n")
    assert main(["train", str(path)]) == 2
    assert "[training]: output_dir=" in capsys.readouterr().err
    import llmft

    monkeypatch.setattr(llmft, "load_model", _must_not_load)
    with pytest.raises(ValueError, match="is a file"):
        recipes.run_recipe(path, "train", smoke=False)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    path = _recipe_file(tmp_path, "model: {name: testing:tiny_model}\ndata: {dataset: testing:finetome, format: "
                                  "sharegpt}\ntraining: {learning_rate: 2e-4, num_train_epochs: 1e-1}\n")
    recipe = recipes.load_recipe(path)
    assert recipe["training"]["learning_rate"] == "2e-4"  # what PyYAML reads (YAML 1.1 wants 2.0e-4)
    recipes.check_recipe(recipe, "train", str(path))
    from llmft.trl_configs import LlmftSFTConfig, config_from

    options = config_from(LlmftSFTConfig, "train", recipe["training"])
    assert options.learning_rate == 2e-4 and options.num_train_epochs == 0.1


def test_bad_data_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import llmft

    monkeypatch.setattr(llmft, "load_model", _must_not_load)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n' * 4)
    path = _recipe_file(tmp_path, "model: {name: testing:tiny_model}\n"
                                  f"data: {{dataset: {rows}, format: sharegpt, eval_rows: 0}}\n"
                                  f"training: {{output_dir: {tmp_path / 'out'}, max_steps: 2}}\n")
    with pytest.raises(llmft.DataError, match=r"sharegpt_to_messages: the dataset has no column\(s\) "
                                              r"\['conversations'\]"):
        recipes.run_recipe(path, "train", smoke=False)
    assert main(["train", str(path)]) == 2 and "error: sharegpt_to_messages" in capsys.readouterr().err
    split = _recipe_file(tmp_path, path.read_text().replace("eval_rows: 0", "split: test"))
    with pytest.raises(ValueError, match=r"data.split='test': .*rows.jsonl: .*train"):
        recipes.run_recipe(split, "train", smoke=False)


def test_command_line_overrides_win_over_the_file_and_its_smoke_section(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the smoke section writes to outputs/01_sft_smoke
    recipe = str(REPO / "recipes" / "01_sft.yaml")
    assert main(["train", recipe, "--smoke", "--max_steps", "3", "--learning_rate=1e-3", "--model.lora_r", "4",
                 "--eval_steps", "3", "--save_steps", "3"]) == 0
    out = tmp_path / "outputs" / "01_sft_smoke"
    saved = json.loads((out / "llmft_config.json").read_text())["options"]
    assert saved["max_steps"] == 3 and saved["learning_rate"] == 1e-3  # "1e-3" read as a number
    assert json.loads((out / "recipe.json").read_text())["model"]["lora_r"] == 4
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["r"] == 4

    for args, message in ((["--learning_rte", "1e-3"], "'learning_rte' (did you mean 'learning_rate'?)"),
                          (["--model.lora_rank", "4"], "'lora_rank' (did you mean 'lora_r'?)"),
                          (["--learning_rate", "abc"], "learning_rate"),
                          (["--max_steps"], "--max_steps needs a value")):
        capsys.readouterr()
        assert main(["train", recipe, "--smoke", *args]) == 2  # before anything loads
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the demos take no overrides
        main(["sft-demo", "--learning_rate", "1"])


@pytest.mark.parametrize("line, message", [
    ("lora_r: abc", r"\[model\]: lora_r='abc': not a number"),
    ("lora_r: 0", r"\[model\]: lora_r=0: the LoRA rank must be positive"),
    ("load_in_4bit: 'no'", r"\[model\]: load_in_4bit='no': expected true or false"),
    ("max_seq_length: 2e3", None),  # a number PyYAML reads as a string is a number
])
def test_model_section_is_typed_and_refused_naming_the_field(tmp_path, capsys, monkeypatch, line, message):
    path = _recipe_file(tmp_path, f"model: {{name: testing:tiny_model, {line}}}\n"
                                  "data: {dataset: testing:finetome, format: sharegpt}\ntraining: {max_steps: 2}\n")
    recipe = recipes.load_recipe(path)
    if message is None:
        recipes.check_recipe(recipe, "train", str(path))
        assert recipes.ModelConfig(**recipe["model"]).max_seq_length == 2000
        return
    with pytest.raises(ValueError, match=message):
        recipes.check_recipe(recipe, "train", str(path))
    assert main(["train", str(path)]) == 2 and re.search(message, capsys.readouterr().err)


def test_load_model_defaults_are_the_model_config_fields():
    import dataclasses
    import inspect

    from llmft import configs, models

    parameters = inspect.signature(models.load_model).parameters
    for field in dataclasses.fields(configs.ModelConfig):
        name = "model_name" if field.name == "name" else field.name
        assert name in parameters, f"ModelConfig.{field.name} is no load_model argument"
        if field.default is not dataclasses.MISSING:
            assert parameters[name].default == field.default, field.name
        assert len(field.metadata.get("help", "")) > 10, field.name
    assert set(parameters) - {"model_name", "from_pretrained_kwargs"} <= set(configs.field_names(configs.ModelConfig))
