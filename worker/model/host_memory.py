"""How much host memory this worker may use: what the VRAM plan counts a swap's pinned copies and a CPU
encode's encoders against (worker/model/plan.py).

The kernel's `MemAvailable` (what can be had without swapping), capped by the cgroup's limit less its use where
the worker runs in a container with one (Kubernetes' memory limit, `docker run --memory`): a container sees the
host's /proc/meminfo, not its own limit. None where neither can be read (not Linux): the plan then counts the GPU
alone, as it did before. A host with several workers (one per card) shares this between them: set
FLUXFARM_HOST_MEMORY_GIB to each worker's share there.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import NamedTuple

from fluxfarm.shared.units import GIB, KIB

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")
_READ_BYTES = 64 * KIB
"""More than /proc/meminfo or a cgroup file holds: every read is bounded."""


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            return file.read(_READ_BYTES).decode("ascii", "replace")
    except OSError:
        return None


def _mem_available(meminfo: Path) -> int | None:
    text = _read(meminfo)
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name == "MemAvailable" and fields and fields[0].isdigit():
            return int(fields[0]) * (KIB if fields[1:] == ["kB"] else 1)
    return None


def _cgroup_room(cgroup: Path) -> int | None:
    """The cgroup v2 limit less its current use; None without a limit ("max") or a cgroup v2."""
    limit, used = _read(cgroup / "memory.max"), _read(cgroup / "memory.current")
    if limit is None or used is None or not limit.strip().isdigit() or not used.strip().isdigit():
        return None
    return max(0, int(limit) - int(used))


def available_host_gib(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> float | None:
    """Host memory this process may still take, in GiB; None where it cannot be read."""
    known = [room for room in (_mem_available(meminfo), _cgroup_room(cgroup)) if room is not None]
    return min(known) / GIB if known else None


PROC_SELF_STATUS = Path("/proc/self/status")


class ProcessHostMemory(NamedTuple):
    """This process's host memory, in GiB, from /proc/self/status."""

    resident: float
    """`VmRSS`: everything resident, the pages of files it maps (safetensors weights) included."""
    anonymous: float
    """`RssAnon`: its own memory (heap, tensors, pinned copies), what the plan's host figures count."""
    peak: float
    """`VmHWM`, the resident peak so far: while a model loads, its mapped weight files' pages count, page cache
    the kernel can take back, so this bounds what loading needed from above."""


def process_host_memory(status: Path = PROC_SELF_STATUS) -> ProcessHostMemory | None:
    """Read when a model has loaded and logged: what a GPU worker holds on the host (CUDA's own share included,
    which the plan's `HOST_PROCESS_GIB` allows for) and how high loading took it. None off Linux."""
    text = _read(status)
    values: dict[str, float] = {}
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name in ("VmRSS", "RssAnon", "VmHWM") and fields and fields[0].isdigit() and fields[1:] == ["kB"]:
            values[name] = int(fields[0]) * KIB / GIB
    if len(values) < 3:
        return None
    return ProcessHostMemory(values["VmRSS"], values["RssAnon"], values["VmHWM"])


class OwnMemoryPeak:
    """The highest `RssAnon` seen while its `with` block runs, sampled by a daemon thread every `interval_s`:
    the kernel keeps a peak of the resident total only (`VmHWM`, mapped weight files included), not of the
    process's own memory, which is what a model's load needs free on the host. A spike shorter than the
    interval can be missed; the figure is logged with the load so a GPU run measures it."""

    def __init__(self, interval_s: float = 0.2, status: Path = PROC_SELF_STATUS) -> None:
        self.gib: float | None = None
        """The peak in GiB once the block has run; None off Linux."""
        self._interval_s, self._status = interval_s, status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="own-memory-peak", daemon=True)

    def __enter__(self) -> OwnMemoryPeak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        memory = process_host_memory(self._status)
        if memory is not None:
            self.gib = max(self.gib or 0.0, memory.anonymous)
