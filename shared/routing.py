"""Which queue a job goes to, and which queues a worker of a given level consumes.

A job asks for `auto` (any level), `min:LEVEL` (that level or better) or `exact:LEVEL`. Each
constraint has its own queue, and a worker consumes exactly the queues its level satisfies, so a
job is only ever delivered to a capable worker and a dataset can insist on one level everywhere.

A job with LoRAs goes to a queue of its own LoRA set under its constraint's queue
(`render.any.lora.<set id>`), which a worker of a fitting level adopts (worker/serve/queue_adoption.py):
jobs of one set then reach the worker that already carries its fused weights.

A job sent for a tenant (a gateway token, or a producer's FLUXFARM_TENANT) goes to its tenant's queue
under its constraint's queue (`render.any.t.<tenant>`), which every worker of a fitting level consumes
beside its constraint queues. kombu's Redis transport takes from a worker's queues in rotation within
each priority step, so one tenant's million jobs and another's ten reach the workers interleaved. Jobs
with LoRAs keep their set's queue: a set's queue already has its own share of the fleet, and splitting
it per tenant would make workers fuse the same set once per tenant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fluxfarm.shared.errors import FarmError, InvalidJob
from fluxfarm.shared.ladder import QuantLevel, parse_level

AUTO = "auto"
QUEUE_PREFIX = "render."
LORA_QUEUE_MARK = ".lora."
_LORA_SET = re.compile(r"[0-9a-f]{16}")
"""shared/adapters.py's lora_set_id: 16 hex digits of a sha256."""
TENANT_QUEUE_MARK = ".t."
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""A tenant's name travels in queue names, metric labels and logs: lowercase letters, digits, '_' and
'-', no '.', which the queue name's parts are split on."""


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


def parse_tenant(name: str) -> str:
    """A tenant name (a gateway token's name): 1-64 lowercase letters, digits, '_' or '-'. InvalidJob (a
    ValueError, so pydantic fields can use it) for anything else."""
    if not _TENANT.fullmatch(name):
        raise InvalidJob(f"a tenant name must be 1-64 lowercase letters, digits, '_' or '-', not {name[:80]!r}")
    return name


def tenant_queue(queue: str, tenant: str | None) -> str:
    """The queue a job bound for `queue` is sent to for `tenant`: the tenant's own under a constraint
    queue; a LoRA set's queue, or any queue without a tenant, unchanged."""
    if tenant is None or split_lora_queue(queue)[1] is not None:
        return queue
    return f"{queue}{TENANT_QUEUE_MARK}{parse_tenant(tenant)}"


def split_tenant_queue(name: str) -> tuple[str, str | None]:
    """`render.any.t.<tenant>` -> (`render.any`, `<tenant>`); a queue without a tenant -> (name, None)."""
    base, mark, tenant = name.partition(TENANT_QUEUE_MARK)
    return (base, tenant) if mark else (name, None)


def constraint_of_queue(name: str) -> QuantConstraint:
    """The constraint whose jobs go to queue `name` (the inverse of `QuantConstraint.queue`), LoRA set
    and tenant queues included."""
    base = split_tenant_queue(split_lora_queue(name)[0])[0]
    kind, _, level = base.removeprefix(QUEUE_PREFIX).partition(".")
    return QuantConstraint("auto") if kind == "any" else parse_constraint(f"{kind}:{level}")


def level_serves(level: QuantLevel, queue: str) -> bool:
    """Whether a worker holding `level` may take the jobs of `queue` (LoRA set and tenant queues included)."""
    return constraint_of_queue(queue).allows(level)


def queues_for_level(level: QuantLevel) -> list[str]:
    """Every queue a worker holding `level` can serve: any, its exact level, and each min it meets."""
    queues = [QuantConstraint("auto").queue, QuantConstraint("exact", level).queue]
    queues += [QuantConstraint("min", other).queue for other in QuantLevel if level.at_least(other)]
    return queues


def added_queue(name: str) -> bool:
    """Whether `name` is a well-formed LoRA set or tenant queue under a constraint queue (the queues made
    as jobs are sent, shared/queue_registry.py); a name in the registry that is not is never consumed."""
    base, lora_set = split_lora_queue(name)
    constraint_queue, tenant = split_tenant_queue(base)
    if (lora_set is None) == (tenant is None) or constraint_queue not in all_queues():
        return False
    if lora_set is not None:
        return bool(_LORA_SET.fullmatch(lora_set))
    return bool(_TENANT.fullmatch(tenant or ""))


def all_queues() -> list[str]:
    """Every constraint queue (LoRA set and tenant queues are registered as they are used:
    shared/queue_registry.py)."""
    names = {QuantConstraint("auto").queue}
    for level in QuantLevel:
        names.update({QuantConstraint("exact", level).queue, QuantConstraint("min", level).queue})
    return sorted(names)
