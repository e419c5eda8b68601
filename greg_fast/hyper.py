"""The schedule's settings, defined once: :class:`Hyper` holds them with the reference's CIFAR
defaults (../shared/greg-spec.md) and validates them; GrowingReg, the ``greg-fast`` flags and the
job's resume check are all built from its fields."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

METHODS = ("greg1", "greg2", "l1")


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Hyper:
    delta: float = _setting(1e-4, "penalty increment of the selected groups")
    interval: int = _setting(10, "iterations between increments")
    ceiling: float = _setting(1.0, "λ at which growth stops")
    stabilize: int = _setting(10000, "iterations at constant λ before pruning")
    pick_delta: float = _setting(1e-5, "GReg-2: increment of every group before the pick")
    pick_ceiling: float = _setting(1e-2, "GReg-2: λ at which each layer picks its groups")
    recover: float = _setting(-1e-4, "GReg-2: λ of the kept groups after the pick")
    mag_ratio_limit: float = _setting(1000.0, "magnitude ratio (kept / pruned mean score) that stops growth")

    @classmethod
    def from_settings(cls, method: str, **settings) -> "Hyper":
        """Validated settings for ``method``: an unknown name or a bad value raises ValueError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown schedule setting(s) {unknown}; the settings are {names}")
        hyper = cls(**settings)
        hyper.check(method)
        return hyper

    def check(self, method: str) -> None:
        """Raise ValueError naming the first bad setting."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        for key in ("interval", "stabilize"):
            value, low = getattr(self, key), 1 if key == "interval" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        for key in ("delta", "ceiling", "pick_delta", "pick_ceiling", "mag_ratio_limit", "recover"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            if value < 0 and key != "recover":  # recover is negative by design (it cancels weight decay)
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if method == "greg2":
            if self.pick_delta <= 0:
                raise ValueError("pick_delta must be > 0 for greg2")
            if self.pick_ceiling > self.ceiling:
                raise ValueError(f"pick_ceiling ({self.pick_ceiling}) must not exceed ceiling ({self.ceiling})")
        if method != "l1" and self.delta <= 0:
            raise ValueError(f"delta must be > 0 for {method}")

    def max_steps(self, method: str) -> int:
        """Optimizer steps from the start until the schedule is done if only the ceiling stops growth:
        exact for L1 (none) and where no layer's magnitude ratio reaches ``mag_ratio_limit`` first,
        else an upper bound (GReg-2: the pick phase, fixed, then growth)."""
        if method == "l1":
            return 0
        picks = math.ceil(self.pick_ceiling / self.pick_delta - 1e-9) if method == "greg2" else 0
        start = picks * self.pick_delta if method == "greg2" else 0.0
        grows = math.floor((self.ceiling - start) / self.delta + 1e-9) + 1
        return (picks + grows - 1) * self.interval + self.stabilize + 1

    def as_dict(self) -> dict:
        """Floats as floats (a setting given as the int 1 is stored as 1.0), for state_dicts."""
        return {f.name: (float(v) if f.type == "float" else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
