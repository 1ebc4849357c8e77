from pathlib import Path

import pytest
import yaml

from label_efficient.recipe import RecipeError, apply_overrides, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE = {"data": {"dataset": "acdc", "image_size": [64, 64]}, "stages": [{"strategy": "supervised", "steps": 10}]}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.stages and r.stages[0].steps > 0


def test_unknown_key_names_key_and_suggestion():
    raw = {**BASE, "stages": [{"strategy": "supervised", "stpes": 10, "steps": 1}]}
    with pytest.raises(RecipeError, match=r"unknown key 'stages.0.stpes'. Did you mean 'steps'\?"):
        parse_recipe(raw)
    with pytest.raises(RecipeError, match=r"unknown key 'trainr'. Did you mean 'trainer'\?"):
        parse_recipe({**BASE, "trainr": {}})
    with pytest.raises(RecipeError, match=r"unknown key 'data.budget.flg'. Did you mean 'flag'\?"):
        parse_recipe({**BASE, "data": {**BASE["data"], "budget": {"flg": "labeled_3"}}})


def test_wrong_type_names_key_and_type():
    raw = {**BASE, "stages": [{"strategy": "supervised", "steps": "many"}]}
    with pytest.raises(RecipeError, match=r"key 'stages.0.steps': Input should be a valid integer"):
        parse_recipe(raw)


def test_unknown_strategy_and_strategy_config_key():
    with pytest.raises(RecipeError, match="unknown strategy 'mean_teachr'. Did you mean 'mean_teacher'"):
        parse_recipe({**BASE, "stages": [{"strategy": "mean_teachr", "steps": 1}]})
    with pytest.raises(RecipeError, match=r"unknown key 'stages.0.config.ema_decy'. Did you mean 'ema_decay'"):
        parse_recipe({**BASE, "stages": [{"strategy": "mean_teacher", "steps": 1, "config": {"ema_decy": 0.9}}]})


def test_missing_key():
    with pytest.raises(RecipeError, match="missing key 'data'"):
        parse_recipe({"stages": BASE["stages"]})


def test_set_overrides():
    r = parse_recipe(BASE, ["stages.0.steps=3", "data.budget={flag: labeled_3}", "trainer.precision=bf16-mixed"])
    assert r.stages[0].steps == 3 and r.data.budget.flag == "labeled_3" and r.trainer.precision == "bf16-mixed"
    with pytest.raises(RecipeError, match="dotted.key=value"):
        apply_overrides(BASE, ["stages.0.steps"])


def test_yaml_is_safe_loaded(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(yaml.YAMLError):
        load_recipe(p)
