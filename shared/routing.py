"""Which queue a job goes to, and which queues a worker of a given level consumes.

A job asks for `auto` (any level), `min:LEVEL` (that level or better) or `exact:LEVEL`. Each
constraint has its own queue, and a worker consumes exactly the queues its level satisfies, so a
job is only ever delivered to a capable worker and a dataset can insist on one level everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.errors import FarmError
from shared.ladder import QuantLevel, parse_level

AUTO = "auto"
QUEUE_PREFIX = "render."


@dataclass(frozen=True)
class QuantConstraint:
    kind: Literal["auto", "min", "exact"]
    level: QuantLevel | None = None

    def __str__(self) -> str:
        return AUTO if self.level is None else f"{self.kind}:{self.level.value}"

    @property
    def queue(self) -> str:
        """The queue jobs with this constraint are sent to."""
        if self.level is None:
            return f"{QUEUE_PREFIX}any"
        return f"{QUEUE_PREFIX}{self.kind}.{self.level.value.lower()}"

    def allows(self, level: QuantLevel) -> bool:
        if self.level is None:
            return True
        return level == self.level if self.kind == "exact" else level.at_least(self.level)


def parse_constraint(text: str) -> QuantConstraint:
    """`auto`, `min:Q6_K` or `exact:Q8_0` (level names case-insensitive)."""
    value = text.strip()
    if value.lower() == AUTO:
        return QuantConstraint("auto")
    kind, sep, level = value.partition(":")
    if not sep or kind.lower() not in ("min", "exact"):
        raise FarmError(f"quant must be 'auto', 'min:LEVEL' or 'exact:LEVEL', not {text!r}")
    return QuantConstraint("min" if kind.lower() == "min" else "exact", parse_level(level))


def constraint_of_queue(name: str) -> QuantConstraint:
    """The constraint whose jobs go to queue `name` (the inverse of `QuantConstraint.queue`)."""
    kind, _, level = name.removeprefix(QUEUE_PREFIX).partition(".")
    return QuantConstraint("auto") if kind == "any" else parse_constraint(f"{kind}:{level}")


def queues_for_level(level: QuantLevel) -> list[str]:
    """Every queue a worker holding `level` can serve: any, its exact level, and each min it meets."""
    queues = [QuantConstraint("auto").queue, QuantConstraint("exact", level).queue]
    queues += [QuantConstraint("min", other).queue for other in QuantLevel if level.at_least(other)]
    return queues


def all_queues() -> list[str]:
    """Every render queue that can exist, for status reports."""
    names = {QuantConstraint("auto").queue}
    for level in QuantLevel:
        names.update({QuantConstraint("exact", level).queue, QuantConstraint("min", level).queue})
    return sorted(names)
