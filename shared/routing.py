"""Which queue a job goes to, and which queues a worker of a given model and level consumes.

Each model has its own queues (`render.flux2-klein-4b.any`), and a worker consumes only those of the
model it loaded. FLUX.1 [dev]'s queues keep the names they had before jobs named their model
(`render.any`), so messages queued before an upgrade are still served.

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
from fluxfarm.shared.models import LEGACY_MODEL, FluxModel

AUTO = "auto"
QUEUE_PREFIX = "render."
LORA_QUEUE_MARK = ".lora."
_LORA_SET = re.compile(r"[0-9a-f]{16}")
"""shared/adapters.py's lora_set_id: 16 hex digits of a sha256."""
TENANT_QUEUE_MARK = ".t."
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""A tenant's name travels in queue names, metric labels and logs: lowercase letters, digits, '_' and
'-', no '.', which the queue name's parts are split on."""


_MODEL_SLUGS = {model.value.replace(".", ""): model for model in FluxModel}
"""A model's name in its queues' names, without the dots the names are split on: `flux2-klein-4b`."""


def _model_part(model: FluxModel) -> str:
    return "" if model == LEGACY_MODEL else f"{model.value.replace('.', '')}."


@dataclass(frozen=True)
class QuantConstraint:
    kind: Literal["auto", "min", "exact"]
    level: QuantLevel | None = None

    def __str__(self) -> str:
        return AUTO if self.level is None else f"{self.kind}:{self.level.value}"

    @property
    def queue(self) -> str:
        """The queue FLUX.1 [dev] jobs with this constraint are sent to."""
        return self.queue_for(LEGACY_MODEL)

    def queue_for(self, model: FluxModel) -> str:
        """The queue `model`'s jobs with this constraint are sent to."""
        part = "any" if self.level is None else f"{self.kind}.{self.level.value.lower()}"
        return f"{QUEUE_PREFIX}{_model_part(model)}{part}"

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


@dataclass(frozen=True)
class QueueName:
    """A render queue's name, read: whose jobs wait there."""

    model: FluxModel
    constraint: QuantConstraint
    tenant: str | None = None
    lora_set: str | None = None

    def __str__(self) -> str:
        return tenant_queue(lora_queue(self.constraint.queue_for(self.model), self.lora_set), self.tenant)


def parse_queue(name: str) -> QueueName | None:
    """The parts of a render queue's name; None for a name that is not one of ours, written exactly as
    the farm writes it (the registry in Redis is written by producers: never trusted as it is)."""
    if not name.startswith(QUEUE_PREFIX):
        return None
    base, lora_set = split_lora_queue(name)
    base, tenant = split_tenant_queue(base)
    parts = base.removeprefix(QUEUE_PREFIX).split(".")
    model = _MODEL_SLUGS.get(parts[0])
    if model is not None:
        parts = parts[1:]
    try:
        if parts == ["any"]:
            constraint = QuantConstraint("auto")
        elif len(parts) == 2 and parts[0] in ("min", "exact"):
            constraint = parse_constraint(f"{parts[0]}:{parts[1]}")
        else:
            return None
        parsed = QueueName(model or LEGACY_MODEL, constraint, tenant, lora_set)
    except FarmError:
        return None
    if lora_set is not None and not _LORA_SET.fullmatch(lora_set):
        return None
    if tenant is not None and not _TENANT.fullmatch(tenant):
        return None
    return parsed if str(parsed) == name else None


def constraint_of_queue(name: str) -> QuantConstraint:
    """The constraint whose jobs go to queue `name`, every kind of render queue included."""
    parsed = parse_queue(name)
    if parsed is None:
        raise FarmError(f"{name[:200]!r} is not a render queue")
    return parsed.constraint


def serves(model: FluxModel, level: QuantLevel, queue: str) -> bool:
    """Whether a worker holding `model` at `level` may take the jobs of `queue`."""
    parsed = parse_queue(queue)
    return parsed is not None and parsed.model == model and parsed.constraint.allows(level)


def queues_for_level(level: QuantLevel, model: FluxModel = LEGACY_MODEL) -> list[str]:
    """Every constraint queue a worker holding `model` at `level` serves: any, its exact level, and each
    min it meets."""
    constraints = [QuantConstraint("auto"), QuantConstraint("exact", level)]
    constraints += [QuantConstraint("min", other) for other in QuantLevel if level.at_least(other)]
    return [constraint.queue_for(model) for constraint in constraints]


def added_queue(name: str) -> bool:
    """Whether `name` is a queue made as jobs are sent (shared/queue_registry.py): a LoRA set's, a
    tenant's, or a constraint queue of a model other than FLUX.1 [dev], whose are always known."""
    parsed = parse_queue(name)
    if parsed is None or (parsed.tenant is not None and parsed.lora_set is not None):
        return False
    return parsed.model != LEGACY_MODEL or parsed.tenant is not None or parsed.lora_set is not None


def all_queues() -> list[str]:
    """FLUX.1 [dev]'s constraint queues, always known (the others are registered as they are used:
    shared/queue_registry.py)."""
    names = {QuantConstraint("auto").queue}
    for level in QuantLevel:
        names.update({QuantConstraint("exact", level).queue, QuantConstraint("min", level).queue})
    return sorted(names)
