"""Which cases to label next (``label-efficient suggest``): the rules, no pool mask read, the CSV as a budget."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from label_efficient.cli import main
from label_efficient.context import DataContext
from label_efficient.data.budget import LabelBudget, split_labeled
from label_efficient.errors import DataError
from label_efficient.recipe import parse_recipe
from label_efficient.suggest import RULES, build_pool, kcenter_greedy, suggest, typiclust

from conftest import tiny_recipe


class Threshold(nn.Module):
    """A stand-in network: class 1 where the image is brighter than 0.5, sharply, so an image at 0.5 everywhere
    is the ambiguous one; dropout on its input term; a 'bottleneck' of intensity moments."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.enc = nn.Identity()
        self.drop = nn.Dropout(p) if p else nn.Identity()
        self.tap_points = {"bottleneck": "enc"}
        self.stride = 1

    def forward(self, x):
        self.enc(torch.cat([x, x * x], 1))
        d = 50 * self.drop(x - 0.5)
        return torch.cat([-d, d], 1)


def _recipe(folder, **data):
    raw = tiny_recipe(folder)
    raw["data"].update(data)
    return parse_recipe(raw)


def _groups(recipe):
    train = [c for c in DataContext.build(recipe.data, recipe.seed).spec.select("train")]
    return split_labeled(train, recipe.data.budget)


def test_kcenter_picks_one_point_of_each_cluster():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.05, (10, 3)), rng.normal(5, 0.05, (10, 3))
    pts = np.concatenate([a, b])
    chosen, dist = kcenter_greedy(pts, 2, rng=np.random.default_rng(1))
    assert sorted(i // 10 for i in chosen) == [0, 1] and dist[1] > 4
    # from a labelled point in cluster a, the pick is in cluster b
    chosen, _ = kcenter_greedy(pts, 1, centres=a[:1])
    assert chosen[0] >= 10


def test_typiclust_takes_the_most_typical_point_of_each_uncovered_cluster():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.1, (12, 2)), rng.normal(5, 0.1, (12, 2))
    a[1] = [0.5, 0.5]  # an outlier of a
    pts = np.concatenate([a, b])

    def most_typical(ix):  # 1 / mean distance to the other 11 points of its cluster, brute force
        d = np.sqrt(((pts[ix][:, None] - pts[ix][None]) ** 2).sum(-1))
        return ix[int(np.argmin(d.sum(1)))]

    chosen, typ, _ = typiclust(pts, 2, rng=np.random.default_rng(3))
    assert sorted(chosen) == sorted([most_typical(np.arange(12)), most_typical(np.arange(12, 24))])
    assert 1 not in chosen and min(typ) > 0
    # with a labelled point in cluster a, one pick goes to the uncovered cluster b
    chosen, _, _ = typiclust(np.concatenate([a, b]), 1, labelled=a[:1] + 0.01, rng=np.random.default_rng(3))
    assert chosen[0] >= 12


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_returns_k_distinct_unlabelled_groups_deterministically(image_folder, rule):
    recipe = _recipe(image_folder)
    labelled, pool = _groups(recipe)
    model = Threshold() if rule in ("entropy", "entropy_kcenter") else None
    a = suggest(recipe, 3, rule, model, seed=5)
    b = suggest(recipe, 3, rule, model, seed=5)
    ids = [s.id for s in a.suggestions]
    assert len(set(ids)) == 3 and set(ids) <= {c.group for c in pool}
    assert not set(ids) & {c.group for c in labelled}
    assert ids == [s.id for s in b.suggestions] and [s.score for s in a.suggestions] == [s.score for s in b.suggestions]
    assert all(s.reason for s in a.suggestions) and sorted(a.labelled) == sorted({c.group for c in labelled})
    if rule == "random":
        other = [{s.id for s in suggest(recipe, 3, rule, seed=k).suggestions} for k in range(6, 10)]
        assert any(o != set(ids) for o in other)  # the seed matters


def _ambiguous_folder(folder, stem: str = "case03"):
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(folder / "images" / f"{stem}.png")
    return folder


@pytest.mark.parametrize("dropout", [0.2, 0.0])
def test_entropy_ranks_the_ambiguous_image_first(image_folder, dropout):
    recipe = _recipe(_ambiguous_folder(image_folder), budget={"ids": ["case00", "case01"]})
    res = suggest(recipe, 2, "entropy", Threshold(dropout), seed=0)
    assert res.suggestions[0].id == "case03"
    assert res.suggestions[0].score > res.suggestions[1].score
    if dropout:
        assert "MC-dropout" in res.suggestions[0].reason
    else:  # no dropout layer: one deterministic pass, and it says so
        assert "one pass, no dropout" in res.suggestions[0].reason and any("no dropout" in n for n in res.notes)
    top = suggest(recipe, 2, "entropy_kcenter", Threshold(dropout), seed=0, top_factor=1)
    assert {s.id for s in top.suggestions} == {s.id for s in res.suggestions}


def test_no_rule_reads_a_mask_of_the_unlabelled_pool(image_folder, forbid_mask_reads):
    recipe = _recipe(image_folder)
    _, pool = _groups(recipe)
    forbid_mask_reads(c.mask for c in pool)
    for rule in RULES:
        suggest(recipe, 2, rule, Threshold() if rule in ("entropy", "entropy_kcenter") else None, seed=1)


def test_csv_round_trips_as_a_budget(image_folder, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(image_folder)))
    out = tmp_path / "to_label.csv"
    assert main(["suggest", str(path), "--count", "2", "--rule", "kcenter", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[0] == "id"
    suggested = [r["id"] for r in rows if r["status"] == "suggested"]
    before, _ = _groups(parse_recipe(tiny_recipe(image_folder)))
    assert len(suggested) == 2 and {r["id"] for r in rows if r["status"] == "labelled"} == {c.group for c in before}
    raw = tiny_recipe(image_folder)
    raw["data"]["budget"] = {"ids_file": str(out)}
    labelled, _ = _groups(parse_recipe(raw))
    assert {c.group for c in labelled} == {r["id"] for r in rows}  # current + suggested
    new = tmp_path / "new.csv"
    assert main(["suggest", str(path), "--count", "2", "--rule", "kcenter", "--new-only", "--out", str(new)]) == 0
    raw["data"]["budget"] = {"ids_file": str(new)}
    labelled, _ = _groups(parse_recipe(raw))
    assert {c.group for c in labelled} == set(suggested)


def test_out_is_refused_when_it_exists_or_lies_in_the_data_folder(image_folder, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(image_folder)))
    out = tmp_path / "to_label.csv"
    out.write_text("keep me\n")
    assert main(["suggest", str(path), "--count", "1", "--rule", "random", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert main(["suggest", str(path), "--count", "1", "--rule", "random", "--out", str(out), "--force"]) == 0
    assert out.read_text().startswith("id,")
    inside = image_folder / "to_label.csv"
    assert main(["suggest", str(path), "--count", "1", "--rule", "random", "--out", str(inside)]) == 2
    assert "inside the data folder" in capsys.readouterr().err and not inside.exists()
    assert main(["suggest", str(path), "--count", "1", "--rule", "entropy", "--out", str(tmp_path / "e.csv")]) == 2
    assert "give --model" in capsys.readouterr().err


def test_ids_file_budget_needs_an_id_column(image_folder, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("case,score\ncase00,1\n")
    train = _groups(_recipe(image_folder))[0] + _groups(_recipe(image_folder))[1]
    with pytest.raises(DataError, match="first column .* must be named 'id'"):
        split_labeled(train, LabelBudget(ids_file=str(bad)))
    good = tmp_path / "good.csv"
    good.write_text("\ufeffid,status\ncase00,suggested\ncase02,labelled\n")  # a spreadsheet's BOM is fine
    labelled, _ = split_labeled(train, LabelBudget(ids_file=str(good)))
    assert {c.group for c in labelled} == {"case00", "case02"}
    with pytest.raises(ValueError, match="exactly one"):
        LabelBudget(ids=["case00"], ids_file=str(good))


def test_pool_is_train_minus_budget_and_refuses_a_full_budget(image_folder):
    pool = build_pool(_recipe(image_folder))
    assert len(pool.labeled) == 4 and len(pool.unlabeled) == 6
    with pytest.raises(DataError, match="nothing left to suggest"):
        build_pool(_recipe(image_folder, budget={"all": True}))


def test_sweep_rounds_train_suggest_and_continue(image_folder, tmp_path):
    from label_efficient.sweep import round_budgets, run_rounds

    r = parse_recipe(tiny_recipe(image_folder, steps=2, val_every=2))
    out = tmp_path / "rounds"
    rows = run_rounds([r], ["random", "entropy"], round_budgets(["2", "4"]), 1, out)
    assert [(row["line"], row["labelled"]) for row in rows] == [("random", 2), ("random", 4), ("entropy", 2),
                                                                ("entropy", 4)]
    assert rows[0]["mean_dice"] == rows[2]["mean_dice"]  # round 1: one shared run
    start = DataContext.build(parse_recipe(yaml.safe_load((out / "start_tiny/budget_2/seed_3/recipe.resolved.yaml")
                                                          .read_text())).data, 3)
    for rule in ("random", "entropy"):
        ids = [row["id"] for row in csv.DictReader(open(out / rule / "budget_2" / "seed_3_next.csv"))]
        assert len(set(ids)) == 4 and {c.group for c in start.labeled} <= set(ids)
        later = parse_recipe(yaml.safe_load((out / rule / "budget_4/seed_3/recipe.resolved.yaml").read_text()))
        assert sorted(later.data.budget.ids) == sorted(ids)
    md = (out / "sweep.md").read_text()
    assert "labels saved vs random" in md and md.count("| entropy |") == 2
    stamp = (out / "entropy/budget_4/seed_3/metrics.json").stat().st_mtime
    run_rounds([r], ["random", "entropy"], [2, 4], 1, out)  # resumable: nothing runs again
    assert (out / "entropy/budget_4/seed_3/metrics.json").stat().st_mtime == stamp
    with pytest.raises(ValueError, match="increasing"):
        round_budgets(["3", "2"])
