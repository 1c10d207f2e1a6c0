"""The limits no policy passes (balloonlab.model.policy): the floor, the ceiling, the step, and
what is refused; a policy's answer read as targets and reasons."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from balloonlab.model.policy import (MIN_FLOOR_BYTES, Decision, GuestLimits, PolicyView, enforce_limits, host_memory,
                                     policy_name, split_decision)

MiB = 1 << 20


def limits(target: int = 512 * MiB, guarantee: int | None = None) -> dict[str, GuestLimits]:
    return {"a": GuestLimits.for_guest("a", 512 * MiB, guarantee, target=target),
            "b": GuestLimits.for_guest("b", 1024 * MiB, None, target=None)}


def test_the_floor_is_the_guarantee_a_share_of_memory_or_96_mib_whichever_is_highest():
    assert GuestLimits.for_guest("a", 512 * MiB).floor_bytes == 128 * MiB  # 25 % of 512 MiB
    assert GuestLimits.for_guest("a", 256 * MiB).floor_bytes == MIN_FLOOR_BYTES == 96 * MiB
    assert GuestLimits.for_guest("a", 512 * MiB, 300 * MiB).floor_bytes == 300 * MiB
    assert GuestLimits.for_guest("a", 64 * MiB).floor_bytes == 64 * MiB  # never above the memory
    assert GuestLimits.for_guest("a", 512 * MiB, floor_fraction=0.5).floor_bytes == 256 * MiB


def test_targets_within_limits_pass_as_given_and_unnamed_guests_keep_theirs():
    out = enforce_limits({"a": 400 * MiB}, limits())
    assert out.targets == {"a": 400 * MiB, "b": 1024 * MiB} and out.changed == ("a",)
    assert out.notes == {} and out.refused == {}
    # a float is rounded to bytes; the same target again is no change
    assert enforce_limits({"a": 400.4 * MiB}, limits()).targets["a"] == round(400.4 * MiB)
    assert enforce_limits({"a": 512 * MiB}, limits()).changed == ()


def test_below_the_floor_is_raised_to_it_and_a_big_move_is_cut_to_the_step():
    out = enforce_limits({"a": 100 * MiB}, limits(target=200 * MiB))
    assert out.targets["a"] == 128 * MiB and out.notes["a"] == f"floor {128 * MiB}"
    out = enforce_limits({"a": 130 * MiB}, limits(target=512 * MiB))  # step: 25 % of 512 MiB
    assert out.targets["a"] == 384 * MiB and out.notes["a"] == f"max_step {128 * MiB}"
    out = enforce_limits({"a": 0}, limits(target=512 * MiB, guarantee=450 * MiB))
    assert out.targets["a"] == 450 * MiB and out.notes["a"] == f"floor {450 * MiB}"
    out = enforce_limits({"b": 2}, limits(), max_step_fraction=0.1)
    assert out.targets["b"] == 1024 * MiB - int(0.1 * 1024 * MiB)
    assert out.notes["b"] == f"floor {256 * MiB}, max_step {int(0.1 * 1024 * MiB)}"


@pytest.mark.parametrize(("value", "why"), [
    (-1, "negative"), (math.nan, "not finite"), (math.inf, "not finite"), (513 * MiB, "above the guest's memory"),
    ("256M", "not a number"), (True, "not a number"), (None, "not a number"),
])
def test_nonsense_is_refused_and_the_guest_keeps_its_last_safe_target(value, why):
    out = enforce_limits({"a": value, "b": 900 * MiB}, limits(target=300 * MiB))
    assert out.targets == {"a": 300 * MiB, "b": 900 * MiB} and out.changed == ("b",)
    assert why in out.refused["a"] and set(out.refused) == {"a"}


def test_a_guest_that_is_not_in_the_run_is_refused_by_name():
    out = enforce_limits({"ghost": 300 * MiB, 7: 1}, limits())
    assert out.changed == () and "no guest 'ghost' in this run (guests: a, b)" in out.refused["ghost"]
    assert "7" in out.refused


def test_a_policy_returns_a_mapping_a_decision_or_nothing_and_anything_else_is_named():
    assert split_decision({"a": 1}) == ({"a": 1}, {})
    assert split_decision(Decision({"a": 1}, {"a": {"x": 2}})) == ({"a": 1}, {"a": {"x": 2}})
    assert split_decision(None) == ({}, {})
    with pytest.raises(TypeError, match="not list"):
        split_decision([1, 2])
    with pytest.raises(TypeError, match="targets are"):
        split_decision(Decision([("a", 1)]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a dict of reasons per guest"):
        split_decision(Decision({"a": 1}, {"a": 5}))  # type: ignore[dict-item]


def test_an_integer_beyond_any_float_is_refused_not_raised():
    out = enforce_limits({"a": 10**400}, limits(target=300 * MiB))
    assert out.targets["a"] == 300 * MiB and "above the guest's memory" in out.refused["a"]


def test_the_host_as_a_policy_counts_it_with_and_without_a_budget():
    row = pd.Series({"mem_total": 1000, "mem_free": 100, "buffers": 10, "cached": 40, "mem_available": 300,
                     "guests_ram": 250, "guests_rss": 400})
    real = host_memory(row, None)
    assert (real.total, real.available, real.free_with_cache, real.used_by_guests) == (1000, 300, 150, 250)
    budget = host_memory(row, 600)
    assert (budget.total, budget.available, budget.free_with_cache) == (600, 350, 350)
    # a missing value is never read as 0 (an empty budget, a full host): no answer instead
    assert host_memory(pd.Series({"mem_total": 1000, "mem_free": pd.NA, "mem_available": pd.NA, "buffers": 0,
                                  "cached": 0}), None) is None
    assert host_memory(pd.Series({"mem_total": pd.NA, "mem_available": 5}), None) is None
    old_kernel = host_memory(pd.Series({"mem_total": 1000, "mem_free": 50, "buffers": 5, "cached": 20}), None)
    assert old_kernel.available == old_kernel.free_with_cache == 75
    assert host_memory(pd.Series({"guests_ram": pd.NA}), 600) is None
    assert host_memory(pd.Series({"guests_ram": 0}), 600).available == 600


def test_a_view_gives_each_guests_rows_and_its_newest_sample():
    index = pd.to_datetime([1, 2, 3], unit="s", utc=True)
    guests = pd.DataFrame({"guest": pd.Categorical(["a", "b", "a"]), "actual": [1, 2, 3]}, index=index)
    view = PolicyView(index[-1], pd.DataFrame(), guests, limits())
    assert view.names == ["a", "b"] and list(view.guest_rows("a")["actual"]) == [1, 3]
    assert view.guest_last("a")["actual"] == 3 and view.guest_last("c") is None
    assert view.host_memory() is None


def test_a_policy_is_named_by_its_name_attribute_or_its_qualified_name():
    class Named:
        name = "mine"

        def __call__(self, view):
            return {}

    def plain(view):
        return {}
    assert policy_name(Named()) == "mine" and policy_name(plain).endswith("plain")
