"""Which queue a job goes to, and which queues a worker of a given level consumes.

A job asks for `auto` (any level), `min:LEVEL` (that level or better) or `exact:LEVEL`. Each
constraint has its own queue, and a worker consumes exactly the queues its level satisfies, so a
job is only ever delivered to a capable worker and a dataset can insist on one level everywhere.

A job with LoRAs goes to a queue of its own LoRA set under its constraint's queue
(`render.any.lora.<set id>`), which a worker of a fitting level adopts (worker/serve/queue_adoption.py):
jobs of one set then reach the worker that already carries its fused weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel, parse_level

AUTO = "auto"
QUEUE_PREFIX = "render."
LORA_QUEUE_MARK = ".lora."


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


def lora_queue(constraint_queue: str, lora_set: str | None) -> str:
    """The queue of jobs with this constraint queue and LoRA set (the constraint's own without a set)."""
    return constraint_queue if lora_set is None else f"{constraint_queue}{LORA_QUEUE_MARK}{lora_set}"


def split_lora_queue(name: str) -> tuple[str, str | None]:
    """`render.any.lora.<set>` -> (`render.any`, `<set>`); a queue without a set -> (name, None)."""
    base, mark, lora_set = name.partition(LORA_QUEUE_MARK)
    return (base, lora_set) if mark else (name, None)


def constraint_of_queue(name: str) -> QuantConstraint:
    """The constraint whose jobs go to queue `name` (the inverse of `QuantConstraint.queue`), LoRA set
    queues included."""
    kind, _, level = split_lora_queue(name)[0].removeprefix(QUEUE_PREFIX).partition(".")
    return QuantConstraint("auto") if kind == "any" else parse_constraint(f"{kind}:{level}")


def level_serves(level: QuantLevel, queue: str) -> bool:
    """Whether a worker holding `level` may take the jobs of `queue` (LoRA set queues included)."""
    return constraint_of_queue(queue).allows(level)


def queues_for_level(level: QuantLevel) -> list[str]:
    """Every queue a worker holding `level` can serve: any, its exact level, and each min it meets."""
    queues = [QuantConstraint("auto").queue, QuantConstraint("exact", level).queue]
    queues += [QuantConstraint("min", other).queue for other in QuantLevel if level.at_least(other)]
    return queues


def all_queues() -> list[str]:
    """Every render queue without a LoRA set (those are registered as they are used:
    shared/lora_queues.py)."""
    names = {QuantConstraint("auto").queue}
    for level in QuantLevel:
        names.update({QuantConstraint("exact", level).queue, QuantConstraint("min", level).queue})
    return sorted(names)
