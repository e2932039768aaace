"""Which devices ``laneway serve`` starts its workers on: ``--devices auto|cpu|cuda:0,...``.

``auto`` (the default) is one worker per visible CUDA device, or one CPU worker when none
is visible; ``cpu`` is one CPU worker; ``cuda:0,cuda:1`` names the visible devices to use,
one worker each. *Visible* is what a CUDA process started here would see:

- ``CUDA_VISIBLE_DEVICES`` of GPU or MIG UUIDs (``GPU-…``, ``MIG-…``, as ``nvidia-smi -L``
  prints them): one device per UUID, in order. A CUDA process sees at most one MIG slice,
  so each worker gets ``CUDA_VISIBLE_DEVICES=<its UUID>`` and ``--device cuda:0``.
- otherwise (unset, or indices): as many as ``torch.cuda.device_count()`` says in a child
  process, so that this process (the API) never imports torch; the child runs only where
  an NVIDIA device node exists, and costs a torch import (a second or two) once per start.

``nvidia-smi -L`` was not used to count: it ignores ``CUDA_VISIBLE_DEVICES``, may be missing
from an image whose torch can use the GPU, and lists GPUs that a CPU-only torch cannot use
(whose worker would fail every stage)::

    choice = parse_devices("cuda:0,cuda:1")          # ValueError names the bad item
    plan = plan_workers(choice, os.environ, count_cuda_devices)
    # [WorkerDevice(device="cuda:0", environ={}), WorkerDevice(device="cuda:1", environ={})]
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger("laneway.serve")

AUTO, CPU = "auto", "cpu"
#: ``auto``, ``cpu``, or the indices of ``cuda:N`` items, in the order given
DeviceChoice = Literal["auto", "cpu"] | tuple[int, ...]
VISIBLE_VARIABLE = "CUDA_VISIBLE_DEVICES"
_CUDA_ITEM = re.compile(r"cuda:(\d+)")
_UUID_PREFIXES = ("GPU-", "MIG-")
#: device nodes of an NVIDIA driver (Linux, containers with the NVIDIA runtime; WSL2)
DRIVER_NODES = (Path("/dev/nvidiactl"), Path("/dev/dxg"))
COUNT_TIMEOUT_S = 120.0
_COUNT_SCRIPT = "import torch; print(torch.cuda.device_count())"


@dataclass(frozen=True)
class WorkerDevice:
    """One worker ``serve`` starts: its ``--device`` and the variables it gets on top of
    serve's environment (a MIG slice's ``CUDA_VISIBLE_DEVICES``)."""

    device: str
    environ: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return " ".join([self.device, *(f"({k}={v})" for k, v in self.environ.items())])


def parse_devices(text: str) -> DeviceChoice:
    """``auto``, ``cpu`` or a comma-separated list of distinct ``cuda:N``.

    Raises ValueError saying which item is wrong and why.
    """
    items = [item.strip() for item in text.split(",")]
    if items == [AUTO]:
        return "auto"
    if items == [CPU]:
        return "cpu"
    indices: list[int] = []
    for item in items:
        match = _CUDA_ITEM.fullmatch(item)
        if match is None:
            hint = (f"{item!r} stands alone" if item in (AUTO, CPU)
                    else f"{item!r} is not a device")
            raise ValueError(f"{hint}: expected auto, cpu or a comma-separated list of "
                             f"cuda:N (e.g. cuda:0,cuda:1); got {text!r}")
        index = int(match.group(1))
        if index in indices:
            raise ValueError(f"cuda:{index} is given twice (got {text!r}): one worker per "
                             "device")
        indices.append(index)
    return tuple(indices)


def visible_uuids(environ: Mapping[str, str]) -> list[str] | None:
    """The GPU or MIG UUIDs ``CUDA_VISIBLE_DEVICES`` lists; None when it lists none (unset,
    empty, or indices)."""
    items = [item.strip() for item in environ.get(VISIBLE_VARIABLE, "").split(",")]
    if items and all(item.startswith(_UUID_PREFIXES) for item in items):
        return items
    return None


def plan_workers(choice: DeviceChoice, environ: Mapping[str, str],
                 count_cuda: Callable[[], int]) -> list[WorkerDevice]:
    """The workers for ``choice`` on the devices visible with ``environ``; ``count_cuda``
    counts them when ``CUDA_VISIBLE_DEVICES`` lists no UUIDs (``count_cuda_devices``).

    Raises ValueError when a ``cuda:N`` given is not visible.
    """
    if choice == CPU:
        return [WorkerDevice(CPU)]
    uuids = visible_uuids(environ)
    visible = len(uuids) if uuids is not None else count_cuda()
    if choice == AUTO:
        indices: tuple[int, ...] = tuple(range(visible))
        if not indices:
            return [WorkerDevice(CPU)]
    else:
        assert isinstance(choice, tuple)
        indices = choice
        unseen = [f"cuda:{i}" for i in indices if i >= visible]
        if unseen:
            seen = (f"cuda:0 to cuda:{visible - 1}" if visible > 1
                    else "cuda:0" if visible else "none")
            raise ValueError(f"{', '.join(unseen)} not visible here (visible CUDA devices: "
                             f"{seen}; {VISIBLE_VARIABLE}="
                             f"{environ.get(VISIBLE_VARIABLE, '(unset)')})")
    if uuids is None:
        return [WorkerDevice(f"cuda:{i}") for i in indices]
    return [WorkerDevice("cuda:0", {VISIBLE_VARIABLE: uuids[i]}) for i in indices]


def count_cuda_devices() -> int:
    """``torch.cuda.device_count()`` as a child process sees it; 0 without an NVIDIA
    device node (no child then) or when the child fails (logged)."""
    if not any(node.exists() for node in DRIVER_NODES):
        return 0
    try:
        done = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT], capture_output=True,
                              text=True, timeout=COUNT_TIMEOUT_S, check=True)
        return int(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not count the CUDA devices (%s): treating none as visible", exc)
        return 0
