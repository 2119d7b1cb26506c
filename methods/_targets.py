"""Compression targets and the errors of a bad configuration: pure Python, no torch.

Re-exported by :mod:`methods.base` (import them from there); a module of its own so that a command
line is checked (``bench.study``: layer-rate syntax) before torch is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LayerCountError", "MethodConfigError", "Target", "parse_layer_rates"]


class MethodConfigError(ValueError):
    """A hyperparameter, target or rate specification that cannot work; the message is one line."""


class LayerCountError(MethodConfigError):
    """Per-layer rates whose count does not match the model's; ``expected`` is the right count."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected

    def __reduce__(self):  # picklable although __init__ takes two arguments
        return type(self), (str(self), self.expected)


# ---------------------------------------------------------------------------------------- target
_RATES_TERM = re.compile(
    r"^\[\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*\](?:\s*\*\s*(\d+))?$"
)


def parse_layer_rates(spec: str) -> tuple[float, ...]:
    """Parse HRank's per-layer pruning-rate syntax without ``eval``.

    ``"[0.5]*7+[0.95]*5"`` -> seven 0.5 then five 0.95. Each term is ``[rate]`` or ``[rate]*count``;
    also accepted: a plain comma list ``"0.5,0.5,0.9"``. Every rate must lie in [0, 1).
    """
    text = spec.strip()
    if not text:
        raise MethodConfigError("layer rates are empty: write e.g. '[0.5]*7+[0.95]*5'")
    rates: list[float] = []
    if text.startswith("["):
        for term in text.split("+"):
            match = _RATES_TERM.match(term.strip())
            if match is None:
                raise MethodConfigError(
                    f"cannot read layer-rates term {term.strip()!r} in {spec!r}: "
                    "write terms like '[0.5]*7' joined by '+'"
                )
            rates += [float(match.group(1))] * int(match.group(2) or 1)
    else:
        try:
            rates = [float(x) for x in text.split(",")]
        except ValueError:
            raise MethodConfigError(
                f"cannot read layer rates {spec!r}: write '[0.5]*7+[0.95]*5' or '0.5,0.5,0.9'"
            ) from None
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise MethodConfigError(f"layer rate {bad[0]} in {spec!r} is outside [0, 1)")
    return tuple(rates)


@dataclass(frozen=True)
class Target:
    """How much to compress: a params ratio, or explicit per-layer pruning rates.

    Attributes:
        ratio: dense params / compressed stored params (2.0 = half); None with ``layer_rates``.
        layer_rates: fraction of filters (or rank) removed per prunable layer, in the method's layer
            order; HRank syntax when parsed from text.
        tolerance: allowed relative error of the achieved params ratio (0.02 = 2 %).
    """

    ratio: float | None = None
    layer_rates: tuple[float, ...] | None = None
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.layer_rates is None):
            raise MethodConfigError("a target needs exactly one of a ratio or layer rates")
        if self.ratio is not None and not self.ratio > 1.0:
            raise MethodConfigError(
                f"ratio {self.ratio} must be a number > 1 (2 = half the params)"
            )

    @classmethod
    def parse(cls, text: str | float) -> Target:
        """A number is a ratio; a bracketed or comma list (or a ``rates:`` label) is layer rates."""
        if isinstance(text, int | float):
            return cls(ratio=float(text))
        if text.startswith("rates:"):
            return cls(layer_rates=parse_layer_rates(text.removeprefix("rates:")))
        try:
            return cls(ratio=float(text))
        except ValueError:
            return cls(layer_rates=parse_layer_rates(text))

    def bounds(self) -> tuple[float, float]:
        """(lowest, highest) achieved params ratio that meets this ratio target (its tolerance
        either side): what the finals' check and the tuning constraint both hold a run to."""
        if self.ratio is None:
            raise MethodConfigError("layer rates set no ratio: they have no bounds")
        return self.ratio * (1 - self.tolerance), self.ratio * (1 + self.tolerance)

    def check_layer_count(self, n_layers: int, what: str = "prunable layers") -> None:
        """Raise a one-line error when per-layer rates do not match the model's layer count."""
        if self.layer_rates is not None and len(self.layer_rates) != n_layers:
            raise LayerCountError(
                f"{len(self.layer_rates)} layer rates given but the model has {n_layers} {what}: "
                f"give exactly {n_layers}",
                expected=n_layers,
            )

    @property
    def label(self) -> str:
        """Short text used in tags and tables ("4" or "[0.5]*7+[0.95]*5"-style list)."""
        if self.ratio is not None:
            return f"{self.ratio:g}"
        return "rates:" + ",".join(f"{r:g}" for r in self.layer_rates or ())
