"""The project's promises about itself: README commands, CI, the one pinned stack, the public API."""
import json
import re

import pytest

import llmft
from llmft.__main__ import main

from conftest import REPO


def _readme_commands():
    readme = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    assert "python -m llmft demo" in demo and "scripts/install.sh" in demo
    assert "scripts/test.sh" in tests and "scripts/install.sh --dev" in tests
    assert tests in (REPO / ".ci" / "run").read_text()
    runner = (REPO / "scripts" / "test.sh").read_text()
    assert "for bf16 in 0 1" in runner and "UNSLOTH_CPU_BF16=$bf16 python -m pytest" in runner  # both precisions


def test_one_pinned_stack():
    reqs = (REPO / "requirements.txt").read_text()
    for pin in ("transformers==5.17.0", "trl==1.15.0", "peft==0.21.2", "datasets==4.8.5", "bitsandbytes==0.50.2"):
        assert pin in reqs
    assert "torchvision" not in re.sub(r"#.*", "", reqs)
    assert "unsloth==2026.10.9" in (REPO / "requirements-unsloth.txt").read_text()
    assert 'file = ["requirements.txt"]' in (REPO / "pyproject.toml").read_text()
    install = (REPO / "scripts" / "install.sh").read_text()
    assert "torch==2.13.0" in install and "--no-deps -r" in install


def test_public_api():
    for name in llmft.__all__:
        assert hasattr(llmft, name), name
    assert callable(llmft.build_trainer) and callable(llmft.load_model)


def test_demo_help_explains_options(capsys):
    for command, options in (("demo", ("--pretrain-steps", "--mcq-rows", "--seed", "--output-dir")),
                             ("sft-demo", ("--max-steps", "--seed", "--output-dir", "--arch"))):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        for option in options:
            assert option in out


def test_sft_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["sft-demo", "--max-steps", "40", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40 and results["reloaded_adapters_match"] is True
    assert results["eval_loss_after"] < results["eval_loss_before"] - 1.0
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "adapters" / "adapter_model.safetensors").exists()
    assert len((out / "generations.md").read_text().splitlines()) == 2 + 4
    assert main(["sft-demo", "--max-steps", "0", "--output-dir", str(out)]) == 2


def test_forgetting_demo_plumbing_on_a_small_budget(tmp_path):
    """The main job's code path end to end with a tiny budget (the full run's numbers are in the issue note)."""
    out = tmp_path / "demo"
    assert main(["demo", "--pretrain-steps", "20", "--mcq-rows", "16", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["base (no fine-tuning)", "0.2 epoch", "1 epoch", "1 epoch + KD",
                                                   "1 epoch + Chebyshev"]
    assert [r["steps"] for r in results["runs"]] == [0, 1, 2, 2, 2]  # 16 rows / batch 8 = 2 steps per epoch
    assert results["probe_items"] == 117 and all(0 <= r["probe_accuracy"] <= 1 for r in results["runs"])
    assert [c["step"] for c in results["forgetting_curve"]][0] == 0
    summary = (out / "summary.md").read_text()
    assert "headline answer (expected 13)" in summary and summary.startswith("Computed in float32")
    assert len(summary.splitlines()) == 2 + 2 + 5  # precision note + blank line, header, separator, 5 runs
    for name in ("forgetting_curve.png", "training_curves.png", "forgetting_by_run.png", "probe_answers.csv"):
        assert (out / name).exists(), name
