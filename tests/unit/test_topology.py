"""Rank, role and peer arithmetic and the launch validation messages."""

import pytest

from colocate.topology import (RankInfo, Role, TopologyError, rank_info_from_env,
                               validate_gpu_count, validate_pairs)


@pytest.mark.parametrize("world,local_world", [(2, 2), (4, 4), (8, 8), (16, 8)])
def test_roles_peers_and_gpus(world, local_world):
    for rank in range(world):
        info = RankInfo(rank, world, rank % local_world, local_world)
        assert info.role is (Role.TRAINER if rank % 2 == 0 else Role.ENGINE)
        assert info.peer_rank == rank ^ 1
        assert info.pair_index == rank // 2
        assert info.gpu_index == (rank % local_world) // 2
        peer = RankInfo(info.peer_rank, world, info.peer_rank % local_world, local_world)
        assert peer.gpu_index == info.gpu_index and peer.peer_rank == rank
        assert info.trainer_ranks == tuple(range(0, world, 2))
        assert info.engine_ranks == tuple(range(1, world, 2))
        assert rank in info.role_ranks


def env(rank, world, local_rank, local_world):
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world)}


def test_odd_world_size_names_the_fix():
    with pytest.raises(TopologyError, match="world size 3 is odd.*--nproc-per-node 2G"):
        rank_info_from_env(env(0, 3, 0, 3))


def test_odd_nproc_per_node_names_the_fix():
    with pytest.raises(TopologyError, match="--nproc-per-node 3: colocate runs a trainer and "
                                            "an engine per GPU; use an even number >= 2"):
        rank_info_from_env(env(0, 6, 0, 3))


@pytest.mark.parametrize("nproc, gpus, sp_size", [(3, None, 1), (6, None, 2), (4, 1, 1)])
def test_the_launcher_and_start_up_refuse_alike(nproc, gpus, sp_size):
    # One rule set (colocate/geometry.py): `colocate check` before torchrun and every rank
    # at start-up give the same message for the same numbers.
    from colocate.config import ConfigError
    from colocate.preflight import check_launch
    from colocate.topology import validate_gpu_count, validate_sp_size, validate_world

    with pytest.raises(ConfigError) as launcher:
        check_launch(nproc, gpus, "cuda", sp_size)
    info = RankInfo(0, nproc if nproc % 2 == 0 else 2 * nproc, 0, nproc)
    with pytest.raises(TopologyError) as start_up:
        validate_world(info)
        validate_sp_size(info, sp_size)
        validate_gpu_count(info, gpus)
    assert str(start_up.value) == str(launcher.value)


def test_missing_torchrun_env():
    with pytest.raises(TopologyError, match="start colocate with torchrun"):
        rank_info_from_env({})


def test_pair_split_across_nodes():
    info = RankInfo(0, 4, 0, 2)
    with pytest.raises(TopologyError, match="pair 0 is split across nodes"):
        validate_pairs(info, ["a", "b", "b", "b"], [0, 0, 0, 1])
    validate_pairs(info, ["a", "a", "b", "b"], [0, 1, 0, 1])


def test_pair_on_different_gpus():
    info = RankInfo(0, 4, 0, 4)
    with pytest.raises(TopologyError, match="would use different GPUs"):
        validate_pairs(info, ["a"] * 4, [1, 2, 0, 3])


def test_gpu_count_mismatch_names_the_nproc_to_use():
    with pytest.raises(TopologyError, match="--nproc-per-node 4 but 1 GPU.*use --nproc-per-node 2"):
        validate_gpu_count(RankInfo(0, 4, 0, 4), 1)
    validate_gpu_count(RankInfo(0, 4, 0, 4), 2)


def test_sigterm_runs_atexit_on_the_mps_owner(tmp_path):
    """The MPS daemon's owner stops it in an atexit hook; SIGTERM (torchrun's teardown)
    must run that hook instead of killing the process outright."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "atexit-ran"
    script = ("import atexit, time\n"
              "from colocate.topology import _exit_cleanly_on_sigterm\n"
              "_exit_cleanly_on_sigterm()\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "ok"
