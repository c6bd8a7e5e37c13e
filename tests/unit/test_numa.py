"""NUMA mapping on fake sysfs trees, and binding that must never raise."""

from __future__ import annotations

import os

from colocate import numa


def _write(root, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _node(root, node: int, cpus: str, distance: list[int]) -> None:
    _write(root, f"sys/devices/system/node/node{node}/cpulist", cpus)
    _write(root, f"sys/devices/system/node/node{node}/distance", " ".join(map(str, distance)))


def _pci_gpu(root, bus: str, numa_node: int, cls: str = "0x030200", vendor: str = "0x10de",
             device: str = "0x2330") -> None:
    base = f"sys/bus/pci/devices/{bus}"
    _write(root, f"{base}/vendor", vendor)
    _write(root, f"{base}/class", cls)
    _write(root, f"{base}/device", device)
    _write(root, f"{base}/numa_node", str(numa_node))


def _proc_gpu(root, bus: str, uuid: str, model: str = "NVIDIA H100 80GB HBM3") -> None:
    _write(root, f"proc/driver/nvidia/gpus/{bus}/information",
           f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nBus Location: \t {bus}")


def two_socket_tree(root) -> None:
    """2 sockets x 4 GPUs: GPUs 0-3 on node 0, 4-7 on node 1; a non-GPU NVIDIA device too."""
    _write(root, "sys/devices/system/node/online", "0-1")
    _node(root, 0, "0-31,64-95", [10, 21])
    _node(root, 1, "32-63,96-127", [21, 10])
    # Bus ids created out of order: physical order must come from sorting by bus id.
    buses = ["0000:db:00.0", "0000:18:00.0", "0000:9a:00.0", "0000:2a:00.0",
             "0000:ab:00.0", "0000:3a:00.0", "0000:ba:00.0", "0000:5d:00.0"]
    for bus in buses:
        _pci_gpu(root, bus, 0 if bus < "0000:80" else 1)
    _pci_gpu(root, "0000:05:00.0", 0, cls="0x068000")  # NVSwitch/bridge: not a GPU
    _pci_gpu(root, "0000:06:00.0", 0, vendor="0x8086")  # another vendor


def test_two_sockets_maps_each_gpu_to_its_socket(tmp_path):
    two_socket_tree(tmp_path)
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    nodes = [numa.numa_node_for_gpu(i, str(tmp_path), env).node for i in range(8)]
    assert nodes == [0, 0, 0, 0, 1, 1, 1, 1]
    assert numa.numa_node_for_gpu(8, str(tmp_path), env).node is None


def test_cuda_visible_devices_subset_remaps(tmp_path):
    two_socket_tree(tmp_path)
    env = {"CUDA_VISIBLE_DEVICES": "5,6"}
    choice = numa.numa_node_for_gpu(0, str(tmp_path), env)
    assert choice.node == 1 and "physical GPU 5" in choice.reason
    # Ordinal past the visible list, and CUDA's stop-at-first-invalid-entry rule.
    assert numa.numa_node_for_gpu(2, str(tmp_path), env).node is None
    env = {"CUDA_VISIBLE_DEVICES": "1,-1,7"}
    assert numa.numa_node_for_gpu(0, str(tmp_path), env).node == 0
    assert numa.numa_node_for_gpu(1, str(tmp_path), env).node is None
    assert numa.numa_node_for_gpu(0, str(tmp_path), {"CUDA_VISIBLE_DEVICES": ""}).node is None


def test_proc_driver_list_preferred_and_uuids_mapped(tmp_path):
    two_socket_tree(tmp_path)
    # A container given two GPUs: /proc lists only those, sysfs lists all eight.
    _proc_gpu(tmp_path, "0000:ba:00.0", "GPU-bbbb2222-0000")
    _proc_gpu(tmp_path, "0000:18:00.0", "GPU-aaaa1111-0000")
    assert numa.numa_node_for_gpu(1, str(tmp_path), {}).node == 1  # 2nd by bus id: ba
    env = {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa1111-0000"}
    assert numa.numa_node_for_gpu(0, str(tmp_path), env).node == 1
    assert numa.numa_node_for_gpu(1, str(tmp_path), env).node == 0
    # Unknown or MIG UUIDs cannot be mapped without NVML: None, with the reason.
    for entry in ("GPU-ffff", "MIG-GPU-aaaa1111-0000/1/0"):
        choice = numa.numa_node_for_gpu(0, str(tmp_path), {"CUDA_VISIBLE_DEVICES": entry})
        assert choice.node is None and entry[:4] in choice.reason


def test_uuid_without_proc_info_is_unmapped(tmp_path):
    two_socket_tree(tmp_path)
    choice = numa.numa_node_for_gpu(0, str(tmp_path), {"CUDA_VISIBLE_DEVICES": "GPU-aaaa"})
    assert choice.node is None and "UUID" in choice.reason


def test_mixed_models_need_pci_bus_id_order(tmp_path):
    two_socket_tree(tmp_path)
    _pci_gpu(tmp_path, "0000:ee:00.0", 1, device="0x26b9")  # a different model
    assert numa.numa_node_for_gpu(0, str(tmp_path), {}).node is None
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in numa.numa_node_for_gpu(0, str(tmp_path), {}).reason
    assert numa.numa_node_for_gpu(0, str(tmp_path), {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).node == 0


def gb200_tree(root) -> None:
    """Two Grace CPUs (nodes 0, 1); each GPU's memory is a CPU-less node (2..5).

    Node ids are sparse in `online` on purpose: distance rows index online nodes by position.
    """
    _write(root, "sys/devices/system/node/online", "0-1,2-5")
    _node(root, 0, "0-71", [10, 40, 80, 80, 120, 120])
    _node(root, 1, "72-143", [40, 10, 120, 120, 80, 80])
    _node(root, 2, "", [80, 120, 10, 120, 120, 120])
    _node(root, 3, "", [80, 120, 120, 10, 120, 120])
    _node(root, 4, "", [120, 80, 120, 120, 10, 120])
    _node(root, 5, "", [120, 80, 120, 120, 120, 10])
    for i, bus in enumerate(["0008:01:00.0", "0009:01:00.0", "0018:01:00.0", "0019:01:00.0"]):
        _pci_gpu(root, bus, 2 + i, cls="0x030200")


def test_gb200_cpu_less_gpu_nodes_pick_nearest_cpu_node(tmp_path):
    gb200_tree(tmp_path)
    nodes = [numa.numa_node_for_gpu(i, str(tmp_path), {}).node for i in range(4)]
    assert nodes == [0, 0, 1, 1]
    assert "CPU-less node 4" in numa.numa_node_for_gpu(2, str(tmp_path), {}).reason


def test_cpu_less_node_without_distance_is_unknown(tmp_path):
    gb200_tree(tmp_path)
    os.remove(os.path.join(tmp_path, "sys/devices/system/node/node3/distance"))
    assert numa.numa_node_for_gpu(1, str(tmp_path), {}).node is None


def test_numa_node_minus_one_is_unknown(tmp_path):
    _node(tmp_path, 0, "0-7", [10])
    _pci_gpu(tmp_path, "0000:01:00.0", -1)
    choice = numa.numa_node_for_gpu(0, str(tmp_path), {})
    assert choice.node is None and "-1" in choice.reason


def test_missing_files_give_none_not_errors(tmp_path):
    assert numa.numa_node_for_gpu(0, str(tmp_path), {}).node is None  # empty tree
    _pci_gpu(tmp_path, "0000:01:00.0", 0)
    os.remove(os.path.join(tmp_path, "sys/bus/pci/devices/0000:01:00.0/numa_node"))
    assert "numa_node" in numa.numa_node_for_gpu(0, str(tmp_path), {}).reason
    _write(tmp_path, "sys/bus/pci/devices/0000:01:00.0/numa_node", "garbage")
    assert numa.numa_node_for_gpu(0, str(tmp_path), {}).node is None
    # Node 0 exists as a PCI node but its cpulist file is missing: treated as CPU-less.
    _write(tmp_path, "sys/bus/pci/devices/0000:01:00.0/numa_node", "0")
    assert numa.numa_node_for_gpu(0, str(tmp_path), {}).node is None


def test_parse_cpulist():
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert numa.parse_cpulist("") == []


def test_bind_without_libnuma_reports_not_applied(tmp_path):
    two_socket_tree(tmp_path)
    result = numa.bind_to_gpu(5, str(tmp_path), libnuma="libnuma-does-not-exist.so.9", env={})
    assert result.node == 1 and not result.applied
    assert "not loadable" in result.reason


def test_bind_with_unknown_node_does_not_touch_libnuma(tmp_path):
    result = numa.bind_to_gpu(0, str(tmp_path), libnuma="libnuma-does-not-exist.so.9", env={})
    assert result.node is None and not result.applied


def test_real_binding_on_this_machine_does_not_raise():
    # Whatever this host is (no GPU, one node, no libnuma), the calls must come back.
    result = numa.bind_to_gpu(0)
    assert isinstance(result, numa.BindResult)
    applied, reason = numa.apply_node_binding(0)
    assert isinstance(applied, bool) and reason
    applied, reason = numa.apply_node_binding(10_000)  # out of range: refused, not raised
    assert not applied
