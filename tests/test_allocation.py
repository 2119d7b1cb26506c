"""Allocation policies (methods._allocation): lookup, declared support, and each policy's rule."""

import pytest
import torch

from methods._allocation import Allocation, energy_fractions, get_allocation, list_allocations
from methods.base import MethodConfigError, get_method_class, list_methods


def test_lookup_by_name_and_one_line_errors():
    assert list_allocations() == ["uniform", "global", "energy"]
    assert all(get_allocation(n).name == n for n in list_allocations())
    assert isinstance(get_allocation("energy"), Allocation)
    with pytest.raises(
        MethodConfigError, match=r"^svd: allocation='global' must be one of"
    ) as info:
        get_allocation("global", method="svd", supported=("uniform", "energy"))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown allocations"):
        get_allocation("uniform", supported=("uniform", "layerwise"))


def test_each_method_builds_its_search_space_from_the_policies_it_declares():
    with_allocation = [
        name
        for name in list_methods()
        if "allocation" in get_method_class(name).hyperparameter_defaults()
    ]
    assert {"l1_filter", "random", "dct_pruning", "svd", "lrsd", "freq_lowrank"} <= set(
        with_allocation
    )
    for name in with_allocation:
        cls = get_method_class(name)
        assert set(cls.allocations) <= set(list_allocations())
        assert list(cls.search_space["allocation"].choices) == list(cls.allocations)
        assert cls.hyperparameter_defaults()["allocation"] in cls.allocations
    assert get_method_class("l1_filter").allocations == ("uniform", "global")
    assert get_method_class("lrsd").allocations == ("uniform", "energy")


def test_uniform_removes_filters_at_interpolated_rates_and_ranks_by_fraction():
    uniform = get_allocation("uniform")
    assert uniform.removal_keys(torch.rand(4)) == [0.25, 0.5, 0.75]
    assert uniform.rank_at(0.5, 9, None) == 4  # round(4.5), as Python rounds
    assert uniform.smooth_rank_at(0.5, 9, None) == 4.5
    assert uniform.step_key(3, 4, 8, None) == 0.5
    with pytest.raises(NotImplementedError):
        get_allocation("global").rank_at(0.5, 9, None)
    with pytest.raises(NotImplementedError):
        get_allocation("energy").removal_keys(torch.rand(4))


def test_energy_keeps_the_smallest_rank_reaching_the_level():
    energy = get_allocation("energy")
    profile = energy.layer_profile(torch.tensor([3.0, 2.0, 1.0, 1.0]))  # energies 9, 4, 1, 1
    torch.testing.assert_close(profile, energy_fractions(torch.tensor([3.0, 2.0, 1.0, 1.0])))
    # kept fractions 9/15, 13/15, 14/15, 1
    levels = (0.0, 0.6, 0.61, 14 / 15, 1.0)
    assert [energy.rank_at(t, 4, profile) for t in levels] == [1, 1, 2, 3, 4]
    assert energy.smooth_rank_at(0.3, 4, profile) == pytest.approx(0.5)
    assert energy.step_key(1, 2, 4, profile) == pytest.approx(-4 / 15)
    with pytest.raises(ValueError, match="spectrum"):
        energy.layer_profile(None)
