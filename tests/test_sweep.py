"""Label-budget sweep: the grid, resumability, the table, the curve and the labels-saved arithmetic."""
from __future__ import annotations

import csv

import pytest

from label_efficient.cli import main
from label_efficient.recipe import parse_recipe
from label_efficient.sweep import grid, labels_needed

from conftest import tiny_recipe


def test_labels_needed_interpolates_on_the_baseline_curve():
    base = [(1, 0.5, 0, "1"), (3, 0.7, 0, "3"), (7, 0.8, 0, "7")]
    assert labels_needed(base, 0.75) == pytest.approx(5.0)
    assert labels_needed(base, 0.4) == 1.0
    assert labels_needed(base, 0.85) is None


def test_grid_sets_budget_and_seed_and_refuses_multistage_strategy_swaps(image_folder):
    r = parse_recipe(tiny_recipe(image_folder))
    cells = grid([r], ["2", "all"], 2, ["supervised", "mean_teacher"])
    assert len(cells) == 8
    c = cells[1]
    assert (c.line, c.budget, c.seed, c.recipe.data.budget.count) == ("supervised", "2", 4, 2)
    assert cells[-1].recipe.data.budget.all and cells[-1].recipe.stages[0].strategy == "mean_teacher"
    two = tiny_recipe(image_folder)
    two["stages"] = two["stages"] * 2
    with pytest.raises(ValueError, match="single-stage"):
        grid([parse_recipe(two)], ["2"], 1, ["bcp"])


def test_sweep_command_writes_table_curve_and_skips_finished_cells(image_folder, tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    raw = tiny_recipe(image_folder, steps=2, val_every=2)
    path.write_text(yaml.safe_dump(raw))
    args = ["sweep", str(path), "--strategies", "supervised,mean_teacher", "--budgets", "2,4", "--seeds", "1",
            "--out", str(tmp_path / "sw")]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [(r["line"], r["labelled"]) for r in rows] == [("supervised", "2"), ("supervised", "4"),
                                                          ("mean_teacher", "2"), ("mean_teacher", "4")]
    assert (tmp_path / "sw" / "learning_curve.png").stat().st_size > 1000
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert "labels saved vs supervised" in md and md.count("| mean_teacher |") == 2
    stamp = (tmp_path / "sw" / "supervised" / "budget_2" / "seed_3" / "metrics.json").stat().st_mtime
    assert main(args) == 0  # finished cells are not run again
    assert (tmp_path / "sw" / "supervised" / "budget_2" / "seed_3" / "metrics.json").stat().st_mtime == stamp


def test_semi_supervised_cell_without_unlabelled_data_is_skipped_not_fatal(image_folder, tmp_path, caplog):
    from label_efficient.sweep import run_sweep

    r = parse_recipe(tiny_recipe(image_folder, steps=2, val_every=2))
    cells = grid([r], ["2", "all"], 1, ["supervised", "mean_teacher"])
    rows = run_sweep(cells, tmp_path / "sw")
    assert [(row["line"], row["budget"]) for row in rows] == [("supervised", "2"), ("supervised", "all"),
                                                              ("mean_teacher", "2")]
    assert "mean_teacher/budget_all/seed_3 skipped" in caplog.text and "leaves none" in caplog.text
    assert not (tmp_path / "sw" / "mean_teacher" / "budget_all").exists()


def test_sweep_rounds_from_the_command_line_check_their_budgets(image_folder, tmp_path, capsys):
    import yaml

    from label_efficient.cli import main
    from conftest import tiny_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(image_folder)))
    assert main(["sweep", str(recipe), "--select", "random,kcenter", "--rounds", "4,2", "--seeds", "1",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "round" in err and len(err.splitlines()) == 1
