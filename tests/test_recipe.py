"""Recipes: defaults in one place, overrides from the command line, mistakes named precisely."""

from pathlib import Path

import pytest
from conftest import lorakit, write_recipe

from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def test_a_recipe_lists_only_what_differs(work):
    recipe = load_recipe(write_recipe(work / "mine.yaml", "stage: cpt\nmodel: m\ndata: {path: d}\n"))
    assert recipe.method == "lora" and recipe.lora.target == "all-linear"
    assert recipe.data.max_length == 1024 and recipe.data.packing is True
    assert recipe.output_dir == Path("adapters/mine")


def test_overrides_reach_any_key_and_read_yaml_numbers(work):
    path = write_recipe(work / "r.yaml", "stage: cpt\nmodel: m\ndata: {path: d}\ntrain: {lr: 2e-4}\n")
    recipe = load_recipe(path, ["train.lr=1e-3", "lora.r=4", "data.packing=false", "output=out/x"])
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.lora.r == 4 and recipe.data.packing is False and recipe.output_dir == Path("out/x")
    assert load_recipe(path).train.lr == pytest.approx(2e-4)  # YAML reads "2e-4" as a string


@pytest.mark.parametrize("text, message", [
    ("stage: cpt\nmodel: m\ndata: {path: d}\ntrain: {learning_rate: 1}\n", "unknown key train.learning_rate"),
    ("stage: cpt\nmodel: m\ndata: {path: d}\ntrain: {epoch: 1}\n", "did you mean train.epochs?"),
    ("stage: cpt\nmodl: m\ndata: {path: d}\n", "did you mean model?"),
    ("stage: cpt\nmodel: m\ndata: {path: d}\nlora: {r: four}\n", "lora.r must be an integer, got 'four'"),
    ("stage: pretrain\nmodel: m\ndata: {path: d}\n", "stage must be one of cpt, sft"),
    ("stage: cpt\nmodel: m\ndata: {path: d}\ntrain: {lr: -0.1}\n", "train.lr must be positive"),
    ("stage: cpt\nmodel: m\ndata: {path: d}\ntrain: {epochs: 0}\n", "train.epochs must be positive"),
    ("stage: cpt\nmodel: m\n", "missing key data"),
    ("stage: cpt\ndata: {path: d}\n", "needs `model`"),
    ("stage: cpt\nmodel: m\ndata: {path: d}\ntrain: {lr: 0.1}\ntrain: {epochs: 1}\n", "key 'train' is given twice"),
])
def test_mistakes_are_named(work, text, message):
    with pytest.raises(LorakitError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_recipe(write_recipe(work / "bad.yaml", text))


def test_validate_command_checks_without_loading_a_model(work):
    path = write_recipe(work / "r.yaml", "stage: sft\nmodel: no/such-model\ndata: {path: d}\n")
    assert "ok (sft, lora" in lorakit("validate", path).stdout
    bad = lorakit("validate", path, "train.lrr=1", expect=1)
    assert bad.stderr.strip() == "error: command line train.lrr=1: unknown key train.lrr; did you mean train.lr?"


def _recipes():
    return sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes_for_the_real_models():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in _recipes()}
    assert {"qwen2-0.5b-cpt-lora.yaml", "qwen2-0.5b-instruct-sft-lora.yaml", "qwen2-0.5b-sft-on-cpt.yaml"} <= names


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_validates_and_starts_with_its_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    rel = path.relative_to(REPO).as_posix()
    assert first.startswith(f"# lorakit train {rel}"), first
    load_recipe(path)
