"""Bind a rank's CPU threads (and its host memory preference) to the NUMA node near its GPU.

    CUDA ordinal --CUDA_VISIBLE_DEVICES--> physical GPU index --PCI bus order--> bus id
      --/sys/bus/pci/devices/<bus>/numa_node--> node --has no CPUs?--> nearest node with CPUs
      --libnuma numa_run_on_node / numa_set_preferred--> this thread and the threads it spawns

The mapping is pure file reading under ``sysfs_root`` so tests run it on fake trees. The
binding uses only libnuma's integer API through ctypes: nothing that returns a node-mask
pointer (a NULL mask from ``numa_parse_nodestring`` segfaulted another project). Binding is
best effort: a missing library, a single node or a failing call logs one debug line and the
run carries on.

Device order. Physical index i is the i-th NVIDIA GPU sorted by PCI bus id, which is CUDA's
order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (and nvidia-smi's). CUDA's default,
FASTEST_FIRST, agrees on nodes of identical GPUs, the only layout this tool targets; on a
node that mixes GPU models without ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` the mapping is ambiguous
and we bind nothing. Launchers should export ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.

GPU list. ``/proc/driver/nvidia/gpus/<bus>/information`` is preferred: the NVIDIA container
toolkit hides the GPUs a container was not given there, while sysfs always lists every GPU
of the host (so in a container given a subset, the sysfs fallback can pick the wrong GPU; a
wrong node costs only locality, never correctness). It also gives the UUIDs needed to map
``CUDA_VISIBLE_DEVICES=GPU-...`` entries without nvidia-smi.

Call ``bind_to_gpu`` early, before torch creates its thread pools or loads weights:
affinity and memory policy are per thread and only inherited by threads created later.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from dataclasses import dataclass
from typing import Mapping, NamedTuple

log = logging.getLogger(__name__)

LIBNUMA = "libnuma.so.1"
"""Name the loader tries; tests point it at a missing name."""

_NVIDIA_VENDOR = "0x10de"
_GPU_CLASSES = ("0x0302", "0x0300")  # 3D controller (datacenter GPUs), VGA controller


class NodeChoice(NamedTuple):
    node: int | None
    """NUMA node with CPUs to bind to; None when unknown."""
    reason: str
    """How it was chosen, or why not (for one debug line)."""


@dataclass(frozen=True)
class BindResult:
    gpu_index: int
    node: int | None
    """The node chosen (None: unknown, nothing to bind)."""
    reason: str
    applied: bool
    """True only when libnuma accepted both calls."""


# --------------------------------------------------------------------------- file helpers


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _path(root: str, *parts: str) -> str:
    return os.path.join(root, *parts)


def parse_cpulist(text: str) -> list[int]:
    """Kernel list syntax ``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11]; empty -> []."""
    out: list[int] = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


# --------------------------------------------------------------------------- GPU -> bus id


@dataclass(frozen=True)
class _Gpu:
    bus_id: str  # lower-case domain:bus:device.function, e.g. 0000:18:00.0
    uuid: str | None
    model: str | None


def _gpus_from_proc(root: str) -> list[_Gpu]:
    gpus = []
    for d in glob.glob(_path(root, "proc/driver/nvidia/gpus/*")):
        info = _read(os.path.join(d, "information")) or ""
        fields = {}
        for line in info.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        gpus.append(_Gpu(os.path.basename(d).lower(), fields.get("GPU UUID"), fields.get("Model")))
    return gpus


def _gpus_from_sysfs(root: str) -> list[_Gpu]:
    gpus = []
    for d in glob.glob(_path(root, "sys/bus/pci/devices/*")):
        if _read(os.path.join(d, "vendor")) != _NVIDIA_VENDOR:
            continue
        cls = _read(os.path.join(d, "class")) or ""
        if cls[:6] in _GPU_CLASSES:
            gpus.append(_Gpu(os.path.basename(d).lower(), None, _read(os.path.join(d, "device"))))
    return gpus


def _nvidia_gpus(sysfs_root: str = "/") -> tuple[list[_Gpu], str]:
    """NVIDIA GPUs in PCI bus order (= physical index order) and the source used."""
    gpus, source = _gpus_from_proc(sysfs_root), "/proc/driver/nvidia/gpus"
    if not gpus:
        gpus, source = _gpus_from_sysfs(sysfs_root), "sysfs PCI tree"
    # Zero-padded lower-case hex, so string order is bus order.
    return sorted(gpus, key=lambda g: g.bus_id), source


def _visible_entry(gpu_index: int, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The CUDA_VISIBLE_DEVICES entry behind CUDA ordinal ``gpu_index`` (unset: the index)."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return str(gpu_index), "CUDA_VISIBLE_DEVICES unset"
    entries = []
    for raw in cvd.split(","):
        entry = raw.strip()
        # CUDA stops enumerating at the first invalid entry (e.g. "0,2,-1,1" shows 0 and 2).
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    if gpu_index >= len(entries):
        return None, f"CUDA ordinal {gpu_index} is not in CUDA_VISIBLE_DEVICES={cvd!r}"
    return entries[gpu_index], f"CUDA_VISIBLE_DEVICES={cvd!r}"


def _resolve_gpu(gpu_index: int, sysfs_root: str, env: Mapping[str, str]) -> tuple[_Gpu | None, str]:
    entry, how = _visible_entry(gpu_index, env)
    if entry is None:
        return None, how
    gpus, source = _nvidia_gpus(sysfs_root)
    if not gpus:
        return None, "no NVIDIA GPU found in /proc/driver/nvidia or the sysfs PCI tree"
    if entry.startswith("MIG-"):
        return None, f"MIG entry {entry!r} cannot be mapped to a PCI device without NVML"
    if entry.startswith("GPU-"):
        # CUDA accepts any unique UUID prefix; only /proc lists UUIDs (no nvidia-smi here).
        hits = [g for g in gpus if g.uuid and g.uuid.lower().startswith(entry.lower())]
        if len(hits) != 1:
            return None, (f"UUID {entry!r} matches {len(hits)} GPUs listed in {source} "
                          "(UUIDs are only known from /proc/driver/nvidia)")
        return hits[0], f"{how}, UUID {entry} from {source}"
    physical = int(entry)
    if physical >= len(gpus):
        return None, f"physical GPU {physical} ({how}) but {source} lists {len(gpus)} GPUs"
    order = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if order != "PCI_BUS_ID" and len({g.model for g in gpus}) > 1:
        return None, (f"mixed GPU models with CUDA_DEVICE_ORDER={order}: CUDA's order is not "
                      "PCI bus order; export CUDA_DEVICE_ORDER=PCI_BUS_ID")
    return gpus[physical], f"{how}, physical GPU {physical} in PCI bus order from {source}"


# --------------------------------------------------------------------------- node choice


def _online_nodes(root: str) -> list[int]:
    online = _read(_path(root, "sys/devices/system/node/online"))
    if online:
        return parse_cpulist(online)
    dirs = glob.glob(_path(root, "sys/devices/system/node/node[0-9]*"))
    return sorted(int(os.path.basename(d)[4:]) for d in dirs)


def _node_has_cpus(root: str, node: int) -> bool:
    return bool(parse_cpulist(_read(_path(root, f"sys/devices/system/node/node{node}/cpulist")) or ""))


def nearest_cpu_node(node: int, sysfs_root: str = "/") -> int | None:
    """``node`` when it has CPUs; else the closest node that does (by the SLIT distance row).

    GB200-like systems expose GPU memory as CPU-less nodes; the Grace CPU nearest to it is
    the right place for the rank's threads. Ties go to the lowest node id.
    """
    if _node_has_cpus(sysfs_root, node):
        return node
    row = _read(_path(sysfs_root, f"sys/devices/system/node/node{node}/distance"))
    if not row:
        return None
    # The distance row is indexed by position among online nodes, not by node id.
    online = _online_nodes(sysfs_root)
    distances = [int(x) for x in row.split()]
    if len(distances) != len(online):
        return None
    candidates = [(d, n) for n, d in zip(online, distances) if n != node and _node_has_cpus(sysfs_root, n)]
    return min(candidates)[1] if candidates else None


def numa_node_for_gpu(gpu_index: int, sysfs_root: str = "/",
                      env: Mapping[str, str] | None = None) -> NodeChoice:
    """NUMA node with CPUs nearest CUDA ordinal ``gpu_index``; pure file reading, never raises.

    ``env`` (default ``os.environ``) supplies CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER.
    """
    env = os.environ if env is None else env
    try:
        gpu, how = _resolve_gpu(gpu_index, sysfs_root, env)
        if gpu is None:
            return NodeChoice(None, how)
        raw = _read(_path(sysfs_root, f"sys/bus/pci/devices/{gpu.bus_id}/numa_node"))
        if raw is None:
            return NodeChoice(None, f"{how}; no numa_node file for PCI device {gpu.bus_id}")
        pci_node = int(raw)
        if pci_node < 0:
            return NodeChoice(None, f"{how}; PCI device {gpu.bus_id} reports numa_node {pci_node} "
                                    "(no NUMA affinity known)")
        node = nearest_cpu_node(pci_node, sysfs_root)
        if node is None:
            return NodeChoice(None, f"{how}; node {pci_node} of {gpu.bus_id} has no CPUs and no "
                                    "usable distance row to a node that has")
        via = "" if node == pci_node else f" (nearest node with CPUs to CPU-less node {pci_node})"
        return NodeChoice(node, f"{how}; PCI {gpu.bus_id} -> node {node}{via}")
    except (OSError, ValueError) as e:  # malformed sysfs content: locality is optional
        return NodeChoice(None, f"cannot read the NUMA layout: {e}")


# --------------------------------------------------------------------------- binding


def _load_libnuma(name: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    # Declare every signature: the integer API only, no pointers cross this boundary.
    lib.numa_available.argtypes, lib.numa_available.restype = [], ctypes.c_int
    lib.numa_max_node.argtypes, lib.numa_max_node.restype = [], ctypes.c_int
    lib.numa_run_on_node.argtypes, lib.numa_run_on_node.restype = [ctypes.c_int], ctypes.c_int
    lib.numa_set_preferred.argtypes, lib.numa_set_preferred.restype = [ctypes.c_int], None
    return lib


def apply_node_binding(node: int, libnuma: str = LIBNUMA) -> tuple[bool, str]:
    """Run the calling thread on ``node`` and prefer its memory; (applied, reason). Never raises."""
    try:
        lib = _load_libnuma(libnuma)
        if lib is None:
            return False, f"{libnuma} not loadable (install libnuma1 for CPU locality)"
        if lib.numa_available() < 0:
            return False, "numa_available() < 0: the kernel offers no NUMA policy"
        max_node = lib.numa_max_node()
        if max_node < 1:
            return False, "only one NUMA node: nothing to bind"
        if not 0 <= node <= max_node:
            return False, f"node {node} outside libnuma's 0..{max_node}"
        if lib.numa_run_on_node(node) != 0:
            err = ctypes.get_errno() or "?"
            return False, f"numa_run_on_node({node}) failed (errno {err}; a cpuset without that node's CPUs?)"
        # Preferred, not bound: allocations fall back to other nodes instead of failing.
        lib.numa_set_preferred(node)
        return True, f"threads run on node {node}, memory preferred there"
    except Exception as e:  # noqa: BLE001 - locality must never take a rank down
        return False, f"libnuma call failed: {e!r}"


def bind_to_gpu(gpu_index: int, sysfs_root: str = "/", *, libnuma: str = LIBNUMA,
                env: Mapping[str, str] | None = None) -> BindResult:
    """Bind this thread (and threads it creates later) near CUDA ordinal ``gpu_index``.

    Best effort: returns what happened and logs it at debug level; never raises.
    """
    choice = numa_node_for_gpu(gpu_index, sysfs_root, env)
    if choice.node is None:
        result = BindResult(gpu_index, None, choice.reason, False)
    else:
        applied, how = apply_node_binding(choice.node, libnuma)
        result = BindResult(gpu_index, choice.node, f"{choice.reason}; {how}", applied)
    log.debug("numa: GPU %d -> node %s, %s: %s", gpu_index, result.node,
              "bound" if result.applied else "not bound", result.reason)
    return result
