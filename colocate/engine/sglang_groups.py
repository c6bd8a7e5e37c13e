"""Rank arithmetic for sglang's process groups in colocate's interleaved layout. Pure.

    global ranks    0  1  2  3  4  5  6  7        (world 8, tp 2)
    role            T  E  T  E  T  E  T  E
    engine index       0     1     2     3        e = rank // 2
    sglang WORLD       [1, 3, 5, 7]               every engine rank, nobody else
    engine TP groups   [1, 3]      [5, 7]         consecutive blocks of tp engines

sglang builds its groups over a *contiguous* rank space (`range(world)`); ours are the odd
global ranks. So sglang runs in a virtual space where virtual rank v is engine index v, and
`translate_groups` maps the rank lists it asks for back to global engine ranks (see
colocate/engine/sglang_hooks.py for where that happens and why the space is padded).

Nothing here imports torch.distributed or sglang; tests cover every world size.
"""

from __future__ import annotations

from dataclasses import dataclass


def engine_ranks(world_size: int) -> list[int]:
    """Global ranks of the engines: the odd ranks."""
    return list(range(1, world_size, 2))


def validate_engine_tp(world_size: int, local_world_size: int, tp_size: int, *,
                       same_node: bool = True) -> None:
    """ValueError naming `engine.tp_size` and the fix when the TP groups do not fit.

    `same_node`: every TP group on one node. sglang's TP all-reduces twice per layer; over
    NVLink that is cheap, across nodes it dominates the prefill, and sglang's custom
    all-reduce (CUDA IPC) only works inside a node. Blocks of consecutive engines stay on
    one node exactly when the engines per node (local_world_size / 2) are a multiple of tp.
    """
    if tp_size < 1:
        raise ValueError(f"engine.tp_size: got {tp_size}; must be >= 1")
    num_engines = world_size // 2
    if num_engines % tp_size:
        divisors = [d for d in range(1, num_engines + 1) if num_engines % d == 0]
        raise ValueError(
            f"engine.tp_size: {tp_size} does not divide the {num_engines} engine rank(s) of "
            f"this launch (world size {world_size}, one engine per GPU); use one of "
            f"{divisors}, or launch a multiple of {tp_size} GPUs")
    per_node = local_world_size // 2
    if same_node and per_node % tp_size:
        divisors = [d for d in range(1, per_node + 1) if per_node % d == 0]
        raise ValueError(
            f"engine.tp_size: {tp_size} would split a tensor-parallel group across nodes "
            f"({per_node} GPU(s) per node); use one of {divisors} (a TP group must stay "
            "inside one node: its all-reduces run every layer)")


def tp_groups(world_size: int, tp_size: int) -> list[list[int]]:
    """Every engine TP group as global ranks, in creation order: world 8, tp 2 ->
    [[1, 3], [5, 7]]."""
    engines = engine_ranks(world_size)
    if tp_size < 1 or len(engines) % tp_size:
        raise ValueError(f"engine.tp_size: {tp_size} does not divide the {len(engines)} "
                         "engine rank(s)")
    return [engines[i:i + tp_size] for i in range(0, len(engines), tp_size)]


@dataclass(frozen=True)
class EngineGroupLayout:
    """One engine rank's place in sglang's world."""

    rank: int                  # global rank of this engine
    tp_size: int
    tp_rank: int               # index within its TP group
    tp_group: tuple[int, ...]  # global ranks of its TP group
    world: tuple[int, ...]     # global ranks of sglang's WORLD (all engines)

    @property
    def virtual_rank(self) -> int:
        """The rank sglang sees for this engine in its contiguous space."""
        return self.world.index(self.rank)


def engine_group_layout(rank: int, world_size: int, tp_size: int) -> EngineGroupLayout:
    """TP rank, TP group and sglang world of engine `rank`."""
    if rank % 2 == 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not an engine rank of a world of {world_size} "
                         "(engines are the odd ranks)")
    for group in tp_groups(world_size, tp_size):
        if rank in group:
            return EngineGroupLayout(rank=rank, tp_size=tp_size, tp_rank=group.index(rank),
                                     tp_group=tuple(group), world=tuple(engine_ranks(world_size)))
    raise AssertionError("unreachable: every engine is in one TP group")


# --------------------------------------------------------------------------- translation


class UnsupportedSglangGroup(RuntimeError):
    """sglang asked for a group that would span engines and the padding (see below)."""


def translate_groups(name: str, virtual_groups: list[list[int]],
                     world: tuple[int, ...] | list[int]) -> list[list[int]]:
    """Map the rank lists sglang builds in its virtual space to global engine ranks.

    The virtual space is padded past the engines (sglang insists world == tp * pp and takes
    world from torch, which also counts trainers; see sglang_hooks), so virtual ranks
    >= len(world) are phantoms:
      * a group of engines only  -> mapped through `world` (virtual v -> world[v]);
      * a group of phantoms only -> dropped (no engine is a member, none creates it);
      * the "pp" groups          -> one singleton per engine (real pipeline size is 1; the
                                    padding inflated sglang's pp degree);
      * anything else mixes both -> UnsupportedSglangGroup (a parallel mode we do not run).
    """
    n = len(world)
    if name == "pp":
        return [[r] for r in world]
    out = []
    for group in virtual_groups:
        inside = [v < n for v in group]
        if all(inside):
            out.append([world[v] for v in group])
        elif any(inside):
            raise UnsupportedSglangGroup(
                f"sglang group {name!r} {group} spans engines and padding ranks; colocate runs "
                "sglang with tp only (no dp-attention, context, expert or pipeline "
                "parallelism)")
    return out


def micro_batch_offsets(num_tokens: list[int]) -> list[int]:
    """Start of each TP rank's micro-batch in the union the TP group runs (tp > 1)."""
    offsets, total = [], 0
    for n in num_tokens:
        offsets.append(total)
        total += n
    return offsets
