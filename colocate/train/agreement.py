"""Start-up agreement: what the ranks of a training job must agree on before roles diverge.

On many nodes a rank can fail where the others do not: a node that cannot see the config
file, the run directory or the data. If it simply exits, the other nodes wait for it in the
next collective until a timeout (minutes) and then report a vanished peer. So every check
whose answer may differ between nodes is settled over a group, and all ranks fail together,
in seconds, with one message that names the rank, its node and what differs:

1. `settle(error, what, info)`: after each start-up stage that reads files (the config, the
   run directory's checkpoints, the target's config), the ranks exchange whether it failed;
   a rank that failed raises its own error, every other rank raises `StartupError` naming
   the first rank that failed (and, when other nodes succeeded, that the files are missing
   on some nodes only).
2. `check_shared_paths(cfg, info)`: with more than one node, the first rank writes a probe
   file into run.dir and every rank must read it back (a missing mount, or a node-local
   directory of the same name, fails: checkpoints and the export need one directory), and
   every rank must see data.path (each node's engines read it).
3. `check_trainers_agree(...)`: trainers compare the config hash, the data key (a content
   hash of data, tokenizer and template) and the draft vocabulary hash over the trainer
   group; a differing trainer is named with what differs (for the config: which keys).

All of it runs on gloo groups (CPU objects), once, at start-up.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from dataclasses import dataclass

import torch.distributed as dist
import yaml

from colocate.config import Config, ConfigError, describe_path
from colocate.topology import RankInfo, node_label

PROBE_PREFIX = ".colocate-shared-probe-"


class StartupError(ConfigError):
    """Ranks disagree at start-up; raised with the same message on every rank (so the first
    rank alone prints it)."""


def _gather(obj: object, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _my_node(info: RankInfo) -> str:
    return node_label(socket.gethostname(), info.node_rank)


# --------------------------------------------------------------------------- 1. errors


def settle(error: BaseException | None, what: str, info: RankInfo) -> None:
    """Collective over the default group: raise on every rank if `error` is set on any.

    A rank re-raises its own error (its type gives the exit status); the others raise
    StartupError naming the lowest rank that failed."""
    gathered = _gather((_my_node(info), None if error is None else str(error) or
                        type(error).__name__))
    if error is not None:
        raise error
    failed = [(rank, node, msg) for rank, (node, msg) in enumerate(gathered) if msg is not None]
    if not failed:
        return
    rank, node, msg = failed[0]
    bad_nodes = {n for _, n, _ in failed}
    good_nodes = {n for n, msg in gathered if msg is None} - bad_nodes
    hint = ""
    if good_nodes:
        hint = (f" (it worked on {', '.join(sorted(good_nodes))}: every node must see the same "
                "files; is the filesystem shared, or the node-local copy missing?)")
    raise StartupError(f"{what} failed on rank {rank}, {node}: {msg}{hint}")


# --------------------------------------------------------------------------- 2. shared files


def _write_probe(run_dir: str, token: str) -> list[str]:
    """Write the probe file into run_dir (creating it); returns the directories created,
    deepest first."""
    created, path = [], os.path.abspath(run_dir)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, PROBE_PREFIX + token), "w") as f:
        f.write(token)
    return created


def _remove_probe(run_dir: str, token: str, created: list[str]) -> None:
    """Leave run.dir as it was: a refused run must not create it (train/run_dir.py)."""
    try:
        os.remove(os.path.join(run_dir, PROBE_PREFIX + token))
        for path in created:  # deepest first; rmdir only removes empty ones
            os.rmdir(path)
    except OSError:
        pass


def _sees_probe(run_dir: str, token: str) -> bool:
    try:
        with open(os.path.join(run_dir, PROBE_PREFIX + token)) as f:
            return f.read() == token
    except OSError:
        return False


def check_shared_paths(cfg: Config, info: RankInfo) -> None:
    """Every node sees run.dir (the same directory) and data.path; collective over the
    default group. A job on one node has one filesystem: nothing to check."""
    if info.num_nodes == 1:
        return
    token, created, error = secrets.token_hex(8), [], None
    if info.rank == 0:
        try:
            created = _write_probe(cfg.run.dir, token)
        except OSError as e:
            error = ConfigError(f"run.dir {describe_path(cfg.run.dir)}: cannot write there: {e}")
    settle(error, "creating run.dir", info)
    token = _gather(token)[0]  # rank 0's
    view = (_my_node(info), _sees_probe(cfg.run.dir, token), os.path.abspath(cfg.run.dir),
            os.path.isfile(cfg.data.path) and os.access(cfg.data.path, os.R_OK),
            os.path.abspath(cfg.data.path))
    views = _gather(view)
    if info.rank == 0:
        _remove_probe(cfg.run.dir, token, created)
    problems = shared_path_problems(views)
    if problems:
        raise StartupError("; ".join(problems))


def _ranks_by_node(views: list, ok_index: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for rank, view in enumerate(views):
        if not view[ok_index]:
            out.setdefault(view[0], []).append(rank)
    return out


def _span(ranks: list[int]) -> str:
    contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 and contiguous else ", ".join(map(str, ranks))


def shared_path_problems(views: list[tuple]) -> list[str]:
    """Messages for the nodes that miss the run dir or the data; [] when all see both.
    `views[rank]` = (node, sees_run_dir, run_dir_abspath, sees_data, data_abspath)."""
    problems = []
    first = views[0]
    for node, ranks in _ranks_by_node(views, 1).items():
        problems.append(
            f"run.dir is not shared: ranks {_span(ranks)} on {node} do not see the probe file "
            f"rank 0 on {first[0]} wrote into {first[2]} (they looked in "
            f"{views[ranks[0]][2]}); checkpoints and the export need one directory that every "
            "node sees: put run.dir on a shared filesystem, at the same path on every node")
    for node, ranks in _ranks_by_node(views, 3).items():
        problems.append(
            f"data.path is not readable by ranks {_span(ranks)} on {node} (looked for "
            f"{views[ranks[0]][4]}); every node's engines read it: put it on a shared "
            "filesystem or copy it to the same path on every node")
    return problems


# --------------------------------------------------------------------------- 3. trainers


@dataclass(frozen=True)
class TrainerView:
    """What one trainer trains: compared across trainers at start-up."""
    rank: int
    node: str
    config_hash: str
    data_key: str
    vocab_sha: str


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(yaml.safe_dump(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def flat_config(cfg: Config) -> dict[str, object]:
    """Dotted key -> value, to name the keys in which two configs differ."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value
    walk("", cfg.to_dict())
    return out


def disagreement(views: list[TrainerView], configs: list[dict] | None = None) -> str | None:
    """The message when some trainer differs from the first one; None when all agree.
    `configs`: every trainer's flat_config, to list the differing keys (optional)."""
    ref = views[0]
    lines = []
    for i, view in enumerate(views[1:], start=1):
        what = []
        if view.config_hash != ref.config_hash:
            keys = ""
            if configs is not None:
                diff = [k for k in sorted(set(configs[0]) | set(configs[i]))
                        if configs[0].get(k) != configs[i].get(k)]
                keys = ": " + ", ".join(f"{k} {configs[0].get(k)!r} vs {configs[i].get(k)!r}"
                                        for k in diff[:5]) + (" ..." if len(diff) > 5 else "")
            what.append(f"the config (hash {ref.config_hash} vs {view.config_hash}{keys})")
        if view.data_key != ref.data_key:
            what.append(f"the data key ({ref.data_key[:16]} vs {view.data_key[:16]})")
        if view.vocab_sha != ref.vocab_sha:
            what.append(f"the draft vocabulary (sha {ref.vocab_sha} vs {view.vocab_sha})")
        if what:
            lines.append(f"trainer rank {view.rank} on {view.node} differs from trainer rank "
                         f"{ref.rank} on {ref.node} in {' and '.join(what)}")
    if not lines:
        return None
    return ("trainers disagree on what they train: " + "; ".join(lines) + ". Every node must "
            "run the same config and read the same data.path and target tokenizer (a "
            "node-local copy that differs, or a node that does not see the shared files?)")


def check_trainers_agree(cfg: Config, *, group, rank: int, node: str, data_key: str,
                         vocab_sha: str) -> None:
    """Collective over the trainers' gloo `group`: raise StartupError on every trainer when
    one differs from the first in config, data or draft vocabulary."""
    views = _gather(TrainerView(rank, node, config_hash(cfg), data_key, vocab_sha), group)
    configs = None
    if len({v.config_hash for v in views}) > 1:  # every trainer takes this branch alike
        configs = _gather(flat_config(cfg), group)
    message = disagreement(views, configs)
    if message:
        raise StartupError(message)
