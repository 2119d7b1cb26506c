"""Allocation policies: how one whole-model budget is spread over the layers.

A method that meets a params ratio for the whole model must decide how much each layer keeps. That
decision is the *policy* (Torch-Pruning keeps it apart from the structure and the criterion), and
it is the ``allocation`` hyperparameter of the methods that have one:

- ``uniform``: every layer keeps the same fraction of its units (filters, or its full rank);
- ``global`` (filter pruning): one threshold over filter scores divided by their layer's mean;
- ``energy`` (low rank): each layer keeps the smallest rank whose share of its squared spectrum
  reaches one threshold shared by the model.

The units are filters for structured pruning (``methods._structured``) and ranks for low-rank
factorisation (``methods._lowrank``, ``methods.lrsd``). Each method declares the names it supports
(``allocations``), builds its search space from them and checks its argument with
:func:`get_allocation`; the plumbing looks the policy up by the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from methods._checks import check_choice

__all__ = [
    "Allocation",
    "Energy",
    "Global",
    "Uniform",
    "energy_fractions",
    "get_allocation",
    "list_allocations",
]


class Allocation:
    """Base of the allocation policies: subclass, set ``name``, implement the hooks of the units
    the policy spreads, and add an instance to ``_POLICIES`` (as Optuna's ``BaseSampler``).

    Lifecycle (what a method and its plumbing do with a policy):

    1. The method's ``__init__`` calls ``get_allocation(allocation, method=..., supported=...)``: an
       unknown name, or one the method does not declare, raises a one-line ``MethodConfigError``
       before any model is seen. The method stores the name (a hyperparameter; run keys hash it).
    2. Filter pruning (``methods._structured.removal_order``) asks each layer's
       :meth:`removal_keys` and removes single filters in ascending key across all layers.
    3. Rank allocation (``allocate_ranks``, ``lrsd.plan_splits``) measures a spectrum per layer
       when ``needs_spectrum`` (singular values of W for ``svd`` and ``freq_lowrank``, square
       roots of the eigenvalues of W Sigma W^T for ``lrsd``), turns each into the layer's profile
       once (:meth:`layer_profile`), then asks :meth:`rank_at` (or :meth:`smooth_rank_at`) for many
       levels t while bisecting on t, and :meth:`step_key` while topping ranks up one at a time.

    Invariants an implementation keeps:

    - Stateless and deterministic: no per-model state, no RNG; the same inputs give the same keys
      and ranks (so a policy instance is shared by every caller).
    - ``removal_keys`` returns ``n - 1`` keys for an ``n``-filter layer, ascending: the last filter
      is never removed. Ties between layers go to the lower layer index (the callers sort
      ``(key, layer)`` pairs).
    - ``rank_at`` and ``smooth_rank_at`` are non-decreasing in t on [0, 1] and reach the layer's
      full rank at t = 1, so bisection on t is sound; the caller clamps ranks to [1, full rank].
    - ``step_key``: a lower key is topped up first.
    - The name never changes: it is a stored hyperparameter value.

    Hooks a policy does not serve raise ``NotImplementedError``; a method only declares policies
    whose hooks its plumbing calls.
    """

    name: ClassVar[str] = ""
    needs_spectrum: ClassVar[bool] = False

    # -- filters (structured pruning)
    def removal_keys(self, scores: torch.Tensor) -> list[float]:
        """One key per filter removal of a layer with these (non-negative) filter scores."""
        raise NotImplementedError(f"the {self.name!r} allocation does not spread filters")

    # -- ranks (low-rank factorisation)
    def layer_profile(self, spectrum: torch.Tensor | None) -> torch.Tensor | None:
        """What :meth:`rank_at` reads of one layer, computed once from its spectrum (descending)."""
        return None

    def rank_at(self, t: float, full_rank: int, profile: torch.Tensor | None) -> int:
        """The layer's rank at level ``t`` in [0, 1] (before clamping to [1, full_rank])."""
        raise NotImplementedError(f"the {self.name!r} allocation does not spread ranks")

    def smooth_rank_at(self, t: float, full_rank: int, profile: torch.Tensor | None) -> float:
        """A continuous rank at level ``t``: budgets that move smoothly with t (``lrsd``)."""
        raise NotImplementedError(f"the {self.name!r} allocation does not spread ranks")

    def step_key(
        self, rank: int, next_rank: int, full_rank: int, profile: torch.Tensor | None
    ) -> float:
        """Priority of raising a layer from ``rank`` to ``next_rank`` (lower goes first)."""
        raise NotImplementedError(f"the {self.name!r} allocation does not spread ranks")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Uniform(Allocation):
    """The same fraction of every layer: rate j / n for the j-th filter, round(t * full rank)."""

    name = "uniform"

    def removal_keys(self, scores: torch.Tensor) -> list[float]:
        # the j-th filter of an n-filter layer goes at rate j / n, so the first m removals
        # interpolate between uniform rates one filter at a time
        n = len(scores)
        return [j / n for j in range(1, n)]

    def rank_at(self, t: float, full_rank: int, profile: torch.Tensor | None) -> int:
        return round(t * full_rank)

    def smooth_rank_at(self, t: float, full_rank: int, profile: torch.Tensor | None) -> float:
        return t * full_rank

    def step_key(
        self, rank: int, next_rank: int, full_rank: int, profile: torch.Tensor | None
    ) -> float:
        # the layer with the lowest rank fraction after the step
        return next_rank / full_rank


class Global(Allocation):
    """One threshold over all filters, on scores normalised by their layer's mean score.

    Scores are non-negative (L1 norms, energies, uniform draws); a layer whose mean is 0 is left
    unnormalised.
    """

    name = "global"

    def removal_keys(self, scores: torch.Tensor) -> list[float]:
        s = scores.detach().cpu().double()
        normalised = s / s.mean() if s.mean() > 0 else s
        # the layer's best filter is never removed; the rest leave lowest score first
        return [float(v) for v in normalised.sort().values[:-1]]


def energy_fractions(spectrum: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of squared singular values, kept by ranks 1..len (last entry 1)."""
    energy = spectrum.detach().cpu().double().square()  # CPU: bisection probes it many times
    total = energy.sum()
    if total <= 0:
        return torch.ones_like(energy)
    return (energy.cumsum(0) / total).clamp_max(1.0)


class Energy(Allocation):
    """The smallest rank whose share of the layer's squared spectrum reaches the level t.

    The profile is :func:`energy_fractions` of the spectrum; top-ups go to the layer whose next
    singular value holds the largest share of its energy.
    """

    name = "energy"
    needs_spectrum = True

    def layer_profile(self, spectrum: torch.Tensor | None) -> torch.Tensor | None:
        if spectrum is None:
            raise ValueError("the energy allocation needs a spectrum per layer")
        return energy_fractions(spectrum)

    def rank_at(self, t: float, full_rank: int, profile: torch.Tensor | None) -> int:
        # smallest r whose kept-energy fraction reaches t (1e-12: t = 1 must reach full rank)
        return int(torch.searchsorted(profile, t - 1e-12)) + 1

    def smooth_rank_at(self, t: float, full_rank: int, profile: torch.Tensor | None) -> float:
        # the cumulative energy curve inverted piecewise-linearly: a continuous rank, so a
        # budget (and the nonzeros that fill it) moves smoothly with t and bisection meets 2 %
        f = profile
        j = min(int(torch.searchsorted(f, t)), len(f) - 1)
        lo = float(f[j - 1]) if j > 0 else 0.0
        hi = float(f[j])
        return j + (min(max((t - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 1.0)

    def step_key(
        self, rank: int, next_rank: int, full_rank: int, profile: torch.Tensor | None
    ) -> float:
        return -float(profile[rank] - profile[rank - 1])


_POLICIES: dict[str, Allocation] = {p.name: p for p in (Uniform(), Global(), Energy())}


def list_allocations() -> list[str]:
    """Every policy name, in the order they are documented."""
    return list(_POLICIES)


def get_allocation(
    name: str, *, method: str = "", supported: Sequence[str] | None = None
) -> Allocation:
    """The policy called ``name``.

    Args:
        name: a policy name (the ``allocation`` hyperparameter).
        method: the asking method's name, the prefix of the error message.
        supported: the names the method declares (default: every policy).

    Raises:
        MethodConfigError: ``name`` is not among ``supported`` (one line).
    """
    choices = list_allocations() if supported is None else list(supported)
    unknown = [c for c in choices if c not in _POLICIES]
    if unknown:
        raise ValueError(f"{method or 'a method'} declares unknown allocations {unknown}")
    check_choice(method, "allocation", name, choices)
    return _POLICIES[name]
