"""Recipes (pysparse.cli.recipes): shipped ones build valid pipelines, bad files get clear errors, and
an artifact's recorded recipe makes the same artifact again through the CLI."""

from __future__ import annotations

import pytest
import torch
from testutil import run_cli

import pysparse
from pysparse.cli.recipes import CALIBRATION_DEFAULTS, SHIPPED, Recipe, RecipeError, load_recipe
from pysparse.compiler.manager import PassManager


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipes_build_valid_pipelines(name):
    recipe = load_recipe(name)
    passes = recipe.build()
    PassManager(passes)  # validates the order: raises on a pipeline that cannot run
    assert set(recipe.calibration) == set(CALIBRATION_DEFAULTS)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.passes == recipe.passes and again.calibration == recipe.calibration


def test_recipe_settings_and_calibration_round_trip(tmp_path):
    text = """
passes:
  - relu
  - prosparse: {steps: 7, lam: 0.25}
  - lower
calibration: {lines: 32, batch_size: 4}
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    recipe = load_recipe(str(path))
    assert recipe.passes == [("relu", {}), ("prosparse", {"steps": 7, "lam": 0.25}), ("lower", {})]
    assert recipe.calibration == {**CALIBRATION_DEFAULTS, "lines": 32, "batch_size": 4}
    pro = recipe.build()[1]
    assert pro.name == "prosparse" and pro.steps == 7 and pro.lam == 0.25
    assert Recipe.from_yaml(recipe.to_yaml()).passes == recipe.passes


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("passes: [relu", "not valid YAML"),
        ("- relu", "a mapping with a 'passes' list"),
        ("passes: []", "non-empty list"),
        ("passes: [relu]\nsteps: 3", r"unknown keys \['steps'\]"),
        ("passes: [{relu: 1}]", "must be a name or"),
        ("passes: [relu]\ncalibration: {lines: -1}", "non-negative integer"),
        ("passes: [relu]\ncalibration: {line: 4}", r"unknown calibration keys \['line'\]"),
        ("passes: [{prosparse: {bogus: 1}}]", "settings of pass 'prosparse'"),
    ],
)
def test_bad_recipes_are_named(text, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml(text, "r.yaml").build()


def test_missing_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(RecipeError, match="not a shipped recipe .*fast"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="holds no recipe.yaml"):
        load_recipe(str(tmp_path))


def test_an_artifacts_recipe_makes_it_again(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [relu, {wanda: {}}, compress24]\ncalibration: {lines: 24}\n")
    res = run_cli(
        "compile", "--recipe", str(recipe), "--batch-size", "6", "--no-eval", "--out", "a",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recipe " in res.stdout and "relu,wanda,compress24" in res.stdout
    kept = load_recipe(str(tmp_path / "a"))  # the flag given beside the recipe is folded in
    assert kept.calibration["lines"] == 24 and kept.calibration["batch_size"] == 6
    res = run_cli("compile", "--recipe", "a", "--no-eval", "--out", "b", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = pysparse.load(tmp_path / "a"), pysparse.load(tmp_path / "b")
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)
    res = run_cli("compile", "--recipe", "fast", "--passes", "relu", cwd=tmp_path)
    assert res.returncode == 2 and "not both" in res.stderr
