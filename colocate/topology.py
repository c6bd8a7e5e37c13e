"""Who is who, and every process group of the job. The only module that creates groups.

    torchrun --nnodes M --nproc-per-node 2G -m colocate <command>
      local rank r -> GPU r // 2
      even global rank -> trainer, odd -> engine, peer = rank ^ 1 (same node, same GPU)
      node = torchrun's GROUP_RANK (one agent per node); its local rank 0 owns the node's
      MPS daemon

Everything per node is keyed by LOCAL_RANK / LOCAL_WORLD_SIZE / GROUP_RANK, never by the
global rank: GPU index, NUMA binding, the MPS owner and the status it shares. torchrun gives
each agent a contiguous block of global ranks, so with an even --nproc-per-node ranks 2p and
2p+1 always land on one node; `validate_pairs` checks it anyway.

NCCL refuses two ranks of one communicator on one GPU, so the default group is gloo and
NCCL lives only in role-pure groups: `trainer` (even ranks) and `engine` (odd ranks), each
with a gloo twin for CPU metadata. Every rank creates them in the same order (group creation
is collective over the default group) and keeps the pair for its own role. After start-up
no collective runs on a group holding both roles, except the gloo barriers at start and end
(`init_topology`, `close_topology`). Pair traffic never uses a collective: see transport/.

Start-up order matters: the MPS daemon must be serving, and this process's MPS environment
set, before anything touches CUDA; so GPUs are counted only after `mps.activate`.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist

from colocate.geometry import gpu_count_problem, nproc_problem, sp_size_problem

log = logging.getLogger(__name__)


class TopologyError(ValueError):
    """The launch does not fit the two-ranks-per-GPU layout; the message names the fix."""


class Role(str, Enum):
    TRAINER = "trainer"
    ENGINE = "engine"


@dataclass(frozen=True)
class RankInfo:
    """Rank arithmetic from torchrun's environment; no process group needed."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int = 0
    """torchrun's GROUP_RANK: which agent (node) this rank belongs to."""
    num_nodes: int = 1
    """torchrun's GROUP_WORLD_SIZE: agents (nodes) in the job."""

    @property
    def role(self) -> Role:
        return Role.TRAINER if self.rank % 2 == 0 else Role.ENGINE

    @property
    def peer_rank(self) -> int:
        return self.rank ^ 1

    @property
    def pair_index(self) -> int:
        return self.rank // 2

    @property
    def num_pairs(self) -> int:
        return self.world_size // 2

    @property
    def gpu_index(self) -> int:
        return self.local_rank // 2

    @property
    def trainer_ranks(self) -> tuple[int, ...]:
        return tuple(range(0, self.world_size, 2))

    @property
    def engine_ranks(self) -> tuple[int, ...]:
        return tuple(range(1, self.world_size, 2))

    @property
    def role_ranks(self) -> tuple[int, ...]:
        return self.trainer_ranks if self.role is Role.TRAINER else self.engine_ranks

    @property
    def name(self) -> str:
        return f"{self.role.value} rank {self.rank}"


# What torchrun sets for its workers. A process a rank starts that is no worker of the job
# (an answering engine, a served evaluation) must not inherit them: torch.distributed would
# treat it as one (under TORCHELASTIC_USE_AGENT_STORE it waits for the agent's store).
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                 "MASTER_PORT")


def is_launcher_var(name: str) -> bool:
    return name in LAUNCHER_VARS or name.startswith("TORCHELASTIC_")


def rank_info_from_env(env: dict[str, str] | None = None) -> RankInfo:
    env = os.environ if env is None else env
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k not in env]
    if missing:
        raise TopologyError(
            f"{', '.join(missing)} not set: start colocate with torchrun, e.g. "
            "`torchrun --nproc-per-node 2 -m colocate selftest` (two ranks per GPU)")
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    local_world = int(env["LOCAL_WORLD_SIZE"])
    # GROUP_RANK is torchrun's; other launchers with equal ranks per node imply it.
    world = int(env["WORLD_SIZE"])
    node = int(env.get("GROUP_RANK", (rank - local_rank) // max(local_world, 1)))
    num_nodes = int(env.get("GROUP_WORLD_SIZE", world // max(local_world, 1)))
    info = RankInfo(rank, world, local_rank, local_world, node, num_nodes)
    validate_world(info)
    return info


def validate_world(info: RankInfo) -> None:
    """Checks that need only this rank's numbers."""
    if info.world_size % 2:
        raise TopologyError(
            f"world size {info.world_size} is odd: colocate runs a trainer and an engine per "
            "GPU; use --nproc-per-node 2G (twice the GPUs per node)")
    problem = nproc_problem(info.local_world_size)
    if problem:
        raise TopologyError(problem)


def node_label(host: str, node_rank: int) -> str:
    """How messages name a node: torchrun's node rank and the host (several agents may share
    a host, e.g. in tests)."""
    return f"node {node_rank} ({host})"


def validate_pairs(info: RankInfo, nodes: list[str], local_ranks: list[int]) -> None:
    """Both members of every pair on one node and one GPU (from all ranks' node labels)."""
    for trainer in info.trainer_ranks:
        engine = trainer + 1
        if nodes[trainer] != nodes[engine]:
            raise TopologyError(
                f"pair {trainer // 2} is split across nodes: trainer rank {trainer} on "
                f"{nodes[trainer]}, engine rank {engine} on {nodes[engine]}; give every node "
                "the same even --nproc-per-node so ranks 2p and 2p+1 share a node")
        if local_ranks[trainer] // 2 != local_ranks[engine] // 2:
            raise TopologyError(
                f"pair {trainer // 2}: trainer rank {trainer} (local {local_ranks[trainer]}) and "
                f"engine rank {engine} (local {local_ranks[engine]}) would use different GPUs; "
                "use an even --nproc-per-node with contiguous ranks per node")


def validate_sp_size(info: RankInfo, sp_size: int) -> None:
    problem = sp_size_problem(info.local_world_size, sp_size)
    if problem:
        raise TopologyError(problem)


def sp_groups(info: RankInfo, sp_size: int) -> list[list[int]]:
    """Trainer ranks of every SP group: sp_size consecutive pairs each."""
    trainers = list(info.trainer_ranks)
    return [trainers[i:i + sp_size] for i in range(0, len(trainers), sp_size)]


def validate_gpu_count(info: RankInfo, num_gpus: int) -> None:
    problem = gpu_count_problem(info.local_world_size, num_gpus)
    if problem:
        raise TopologyError(problem)


def resolve_device_type(requested: str) -> str:
    """"auto" -> cuda when a GPU is visible. Uses NVML-free checks so CUDA stays untouched."""
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "cuda"):
        raise TopologyError(f"device {requested!r}: use auto, cuda or cpu")
    # torch.cuda.is_available() would initialise the driver before MPS is set up; the device
    # nodes are a side-effect-free signal that a GPU is present.
    has_gpu = torch.version.cuda is not None and os.path.exists("/dev/nvidiactl")
    if requested == "cuda" and not has_gpu:
        raise TopologyError("device cuda requested but no CUDA GPU/driver is visible; "
                            "use --device cpu (or run.device=cpu) to run on CPU")
    return "cuda" if has_gpu else "cpu"


@dataclass(frozen=True)
class Topology:
    """Frozen view handed to everyone: this rank's place and the groups it may use."""

    info: RankInfo
    device: torch.device
    job_token: str
    pids: tuple[int, ...]
    nodes: tuple[str, ...]             # node_label of every rank, by global rank
    role_group: dist.ProcessGroup      # NCCL on GPU, gloo on CPU; this role's ranks only
    role_cpu_group: dist.ProcessGroup  # gloo twin for CPU metadata
    mps_status: object | None = None   # colocate.mps.MpsStatus; None on CPU
    mps_handle: object | None = None   # mps_daemon.DaemonHandle on the rank that started it
    sp_size: int = 1                   # train.sp_size: pairs that share each micro-batch
    sp_group: dist.ProcessGroup | None = None  # trainers: this one's SP group (None: sp_size 1)

    @property
    def sp_rank(self) -> int:
        """Place in the SP group: which chunk of each micro-batch this pair trains."""
        return self.info.pair_index % self.sp_size

    @property
    def dp_index(self) -> int:
        """Which data shard this pair reads: the pairs of one SP group read the same one."""
        return self.info.pair_index // self.sp_size

    @property
    def num_dp(self) -> int:
        return self.info.num_pairs // self.sp_size

    @property
    def role(self) -> Role:
        return self.info.role

    @property
    def is_trainer(self) -> bool:
        return self.info.role is Role.TRAINER

    @property
    def num_nodes(self) -> int:
        return len(set(self.nodes))

    @property
    def peer_pid(self) -> int:
        return self.pids[self.info.peer_rank]

    @property
    def role_rank(self) -> int:
        """Index among this role's ranks (rank within role_group)."""
        return self.info.rank // 2

    def trainer_mesh(self):
        """1-D DeviceMesh over the trainer group, for FSDP2 (trainers only)."""
        from torch.distributed.device_mesh import DeviceMesh

        assert self.is_trainer, "only trainers hold the trainer mesh"
        return DeviceMesh.from_group(self.role_group, self.device.type)

    @property
    def is_first(self) -> bool:
        """The first rank of its role (logs, exports)."""
        return self.info.rank < 2

    def bound_collectives(self, timeout_s: float) -> bool:
        """Bound every later collective of this role's groups at `timeout_s` (NCCL's
        watchdog aborts, gloo raises): start-up's generous bound is tightened to
        run.timeout_s once training runs, and relaxed again around the announced long
        pauses (checkpoint, export), so a lost peer ends the job in steady state without a
        slow save failing a healthy one. Returns False where this torch cannot (then the
        start-up bound stays)."""
        setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if setter is None:
            return False
        for group in (self.role_group, self.role_cpu_group, self.sp_group):
            if group is not None:
                setter(datetime.timedelta(seconds=timeout_s), group)
        return True


def _gather(obj: object, world_size: int) -> list:
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def init_default_group(timeout_s: float) -> RankInfo:
    """Join the job's default (gloo) group; idempotent. A command may call this before
    `init_topology`, so that a failure found on one node only (a file it cannot see) can
    still be agreed on over the group instead of leaving the other nodes waiting for it."""
    info = rank_info_from_env()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return info


def leave_default_group() -> None:
    """For a command that ends before `init_topology` (nothing to do): no barrier needed,
    every rank leaves at the same point."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_topology(*, device: str = "auto", timeout_s: float = 900.0, mps=None,
                  sp_size: int = 1) -> Topology:
    """Validate the launch, set up MPS and the device, and create every process group.

    `mps`: a config.MpsSection (None: MPS off). `sp_size`: train.sp_size (the trainers'
    sequence-parallel groups). Collectives here run on the default gloo group; they are
    the documented start-up barrier.
    """
    info = init_default_group(timeout_s)
    validate_sp_size(info, sp_size)
    device_type = resolve_device_type(device)
    timeout = datetime.timedelta(seconds=timeout_s)

    # Nodes and pids: pair validation, and pids authenticate the pair channel.
    gathered = _gather((node_label(socket.gethostname(), info.node_rank), info.local_rank,
                        os.getpid()), info.world_size)
    nodes = tuple(g[0] for g in gathered)
    validate_pairs(info, list(nodes), [g[1] for g in gathered])
    pids = tuple(g[2] for g in gathered)
    token = [secrets.token_hex(6) if info.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    job_token = token[0]

    mps_status, mps_handle = None, None
    if device_type == "cuda":
        # CPU affinity reaches only threads created after the call: bind before CUDA starts
        # its own threads.
        _bind_numa(info)
        # The node's local rank 0 (not global rank 0) owns the daemon, and every rank takes
        # the status of its own node's owner.
        owner = next(r for r in range(info.world_size)
                     if nodes[r] == nodes[info.rank] and gathered[r][1] == 0)
        mps_status, mps_handle = _setup_mps(info, mps, job_token, timeout_s, owner)
        num_gpus = torch.cuda.device_count()  # first CUDA call, after MPS is set
        validate_gpu_count(info, num_gpus)
        torch.cuda.set_device(info.gpu_index)
        torch_device = torch.device("cuda", info.gpu_index)
    else:
        torch_device = torch.device("cpu")

    # Same order on every rank: group creation is collective over the default group.
    role_backend = "nccl" if device_type == "cuda" else "gloo"
    groups = {}
    for role, ranks in ((Role.TRAINER, info.trainer_ranks), (Role.ENGINE, info.engine_ranks)):
        groups[role] = (dist.new_group(list(ranks), backend=role_backend, timeout=timeout),
                        dist.new_group(list(ranks), backend="gloo", timeout=timeout))
    role_group, role_cpu_group = groups[info.role]
    sp_group = None
    if sp_size > 1:  # trainer-only, like the role groups; every rank takes part in creating
        for ranks in sp_groups(info, sp_size):
            group = dist.new_group(ranks, backend=role_backend, timeout=timeout)
            if info.rank in ranks:
                sp_group = group
    dist.barrier()  # start-up barrier: every rank has its groups before any role work
    return Topology(info=info, device=torch_device, job_token=job_token, pids=pids, nodes=nodes,
                    role_group=role_group, role_cpu_group=role_cpu_group,
                    mps_status=mps_status, mps_handle=mps_handle, sp_size=sp_size,
                    sp_group=sp_group)


def _setup_mps(info: RankInfo, mps_cfg, job_token: str, timeout_s: float, owner: int):
    """Node-local rank 0 (global rank `owner`) starts (or reuses) the node's daemon; every
    rank of the node activates it before CUDA."""
    from colocate import mps, mps_daemon
    from colocate.config import MpsSection

    plan = mps.plan_from_config(mps_cfg or MpsSection(mode="off"), job_token)
    handle, status = None, None
    if info.local_rank == 0:
        handle = mps_daemon.start_daemon(plan, timeout_s=min(timeout_s, 120.0))
        status = mps.node_status(plan, handle)
        if handle is not None and handle.owned:
            _exit_cleanly_on_sigterm()
    statuses = _gather(status, info.world_size)  # start-up barrier: nobody touches CUDA before
    status = statuses[owner]
    mps.activate(status, info.role.value, device=info.gpu_index)
    return status, handle


def _exit_cleanly_on_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails; Python's default
    action skips atexit, which would leave the MPS daemon this rank owns running. Raising
    SystemExit instead runs the atexit hook that stops it."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _bind_numa(info: RankInfo) -> None:
    from colocate import numa

    result = numa.bind_to_gpu(info.gpu_index)
    log.debug("%s NUMA: %s", info.name, result)


def close_topology(topo: Topology, timeout_s: float = 300.0) -> None:
    """End barrier on the default group (so the MPS owner stops the daemon after the node's
    other ranks are done), then tear the groups down."""
    try:
        if dist.is_initialized():
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s),
                                   wait_all_ranks=True)
    finally:
        if topo.mps_handle is not None:
            from colocate import mps_daemon

            mps_daemon.stop_daemon(topo.mps_handle)
        if dist.is_initialized():
            dist.destroy_process_group()
