"""The one "group cases by volume" of the data pipeline."""
from __future__ import annotations

from label_efficient.data.datasets import Case
from label_efficient.data.loaders import group_by_volume, volume_positions


def _case(i: int, volume: str, index: int) -> Case:
    return Case(id=f"c{i}", image="", mask="", split="train", group="g", volume=volume, index=index)


def test_volumes_in_order_of_first_appearance_slices_in_index_order():
    cases = [_case(0, "b", 2), _case(1, "a", 1), _case(2, "b", 0), _case(3, "a", 0), _case(4, "b", 1)]
    assert volume_positions(cases) == {"b": [2, 4, 0], "a": [3, 1]}
    assert {v: [c.id for c in cs] for v, cs in group_by_volume(cases).items()} == {"b": ["c2", "c4", "c0"],
                                                                                  "a": ["c3", "c1"]}
    assert list(group_by_volume(cases)) == ["b", "a"]
