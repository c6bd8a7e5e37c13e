"""Run under torchrun: each rank reports what its topology and role group look like."""

import json
import os
import sys

import torch
import torch.distributed as dist

from colocate.topology import close_topology, init_topology

topo = init_topology(device="cpu", timeout_s=60)
info = topo.info
x = torch.tensor([float(info.rank)])
dist.all_reduce(x, group=topo.role_group)       # only this role's ranks take part
members = [None] * dist.get_world_size(topo.role_cpu_group)
dist.all_gather_object(members, info.rank, group=topo.role_cpu_group)
report = {"rank": info.rank, "role": info.role.value, "peer": info.peer_rank,
          "role_sum": x.item(), "role_members": members, "role_rank": topo.role_rank,
          "peer_pid_ok": topo.peer_pid != os.getpid()}
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
    json.dump(report, f)
close_topology(topo, timeout_s=60)
sys.stdout.flush()
os._exit(0)  # no interpreter teardown: gloo can abort there (see colocate/__main__.py)
