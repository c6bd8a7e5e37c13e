"""`colocate train`: train a draft (Eagle3 or DFlash, `draft.method`) while the target runs on the same GPUs.

    torchrun --nproc-per-node 2G -m colocate train --config run.yaml [key=value ...]

Even ranks train the draft (FSDP2 over the trainer group); odd ranks run the target and
stream its features through the ring. Writes RUN_DIR/config.yaml, metrics.jsonl,
checkpoints/ and, at the end, export/ (the sglang-loadable draft).
"""

from __future__ import annotations

import argparse
import logging
import os

from colocate.config import RunSection, describe_path, load_config
from colocate.exit_codes import Interrupted

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML run config (default: built-in tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=20 run.dir=runs/x")


def main(args: argparse.Namespace) -> int:
    if "WORLD_SIZE" in os.environ:  # started by a launcher: end with it (first of all:
        from colocate.failures import stop_when_launcher_dies  # the imports take seconds)

        stop_when_launcher_dies()
    from colocate.topology import (close_topology, init_default_group, init_topology,
                                   leave_default_group)
    from colocate.train import agreement
    from colocate.train.pair_session import PairSession
    from colocate.transport import open_pair_channel

    # Every rank joins the default group before anything that reads a file can fail, and
    # the ranks settle each such stage together (agreement.py): a file one node cannot see
    # then fails every node in seconds, naming the rank, instead of leaving the other nodes
    # waiting for it in a collective.
    cfg, error = None, None
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.check_training()
    except Exception as e:  # noqa: BLE001 - settled below, then raised on every rank
        error = e
    if error is not None and "WORLD_SIZE" not in os.environ:
        raise error  # not under torchrun: nobody to tell
    info = init_default_group(cfg.run.startup_timeout_s if cfg else RunSection().startup_timeout_s)
    agreement.settle(error, "loading the config", info)
    agreement.check_shared_paths(cfg, info)  # more than one node: run.dir and data.path
    done = None
    try:
        done, target_config, aux = _read_run_dir_and_target(cfg)
    except Exception as e:  # noqa: BLE001 - settled below
        error = e
    agreement.settle(error, "reading the run directory and the target's config", info)
    if done:  # every rank decides alike, before start-up; rank 0 says it
        if info.rank == 0:
            print(done, flush=True)
        leave_default_group()
        return 0

    topo = init_topology(device=cfg.run.device, timeout_s=cfg.run.startup_timeout_s, mps=cfg.mps,
                         sp_size=cfg.train.sp_size)
    info = topo.info
    # Before any role work, now that CUDA runs under this role's MPS limits: a capped rank
    # must compute its GEMMs right (gemm_check.py). Settled like the stages above, so every
    # rank stops at once instead of the peers waiting out the start-up timeout.
    try:
        _check_gemms_under_sm_cap(cfg, topo, target_config, aux)
    except Exception as e:  # noqa: BLE001 - settled below
        error = e
    agreement.settle(error, "checking the GEMMs under the MPS SM cap", info)
    # From here SIGTERM / SIGINT stop at the next step boundary with a checkpoint (replacing
    # the MPS owner's exit-on-SIGTERM: the graceful path ends in atexit just the same).
    from colocate.train.signals import RUN, STOP

    STOP.install()
    # train.epochs: the last step is known once the engines counted the data (trainer.py).
    RUN.run_dir, RUN.last_step = cfg.run.dir, cfg.train.stop_at_step or cfg.train.max_steps
    RUN.reports = topo.is_first and topo.is_trainer  # one summary line per job
    channel = open_pair_channel(engine=not topo.is_trainer, me=info.name,
                                peer_rank=info.peer_rank, peer_pid=topo.peer_pid,
                                job_token=topo.job_token, pair_index=info.pair_index,
                                timeout_s=cfg.run.startup_timeout_s)
    session = PairSession(channel, topo, startup_s=cfg.run.startup_timeout_s,
                          steady_s=cfg.run.timeout_s)
    # Served evaluations (eval.every_steps / eval.at_end) belong to the first trainer.
    evals = None
    if topo.is_first and topo.is_trainer and (cfg.eval.every_steps or cfg.eval.at_end):
        from colocate.train.served_eval import ServedEvals

        evals = ServedEvals(cfg)
    try:
        if topo.is_trainer:
            _train(cfg, topo, session, target_config, aux, evals)
        else:
            from colocate.train.engine_loop import run_engine

            run_engine(cfg, topo, session, target_config=target_config)
    except Interrupted as e:  # a clean stop: the trainer already ended the stream with `stop`
        if evals is not None:
            evals.stop(str(e))
        raise
    except BaseException as e:
        # Tell the peer why, so it fails with our reason instead of "peer died".
        session.report_error(f"{info.name}: {type(e).__name__}: {e}")
        if evals is not None:
            evals.stop(f"the run failed: {type(e).__name__}")
        raise
    finally:
        channel.close()
    close_topology(topo, timeout_s=cfg.run.timeout_s)
    if evals is not None:  # every rank is done: the engines' GPU memory is free again
        if cfg.eval.at_end:
            evals.launch(cfg.last_step, os.path.join(cfg.run.dir, "export"))
        evals.finish()
    return 0


def _read_run_dir_and_target(cfg):
    """(the "already at step N" line or None, the target's config, the recipe's aux layer
    ids): what a rank reads before start-up, which a node might fail to see."""
    from transformers import AutoConfig

    from colocate.draft.recipe import recipe_for
    from colocate.train.run_dir import finished_message
    from colocate.train.warm_start import check_init_config

    done = finished_message(cfg)
    if not os.path.isfile(os.path.join(cfg.target.path, "config.json")):
        raise FileNotFoundError(f"target.path {describe_path(cfg.target.path)}: no config.json; "
                                "point it at a local model directory (for the demo: python "
                                "examples/tiny/build.py)")
    target_config = AutoConfig.from_pretrained(cfg.target.path, local_files_only=True)
    recipe = recipe_for(cfg)
    aux = recipe.layer_ids(target_config.num_hidden_layers)
    check_init_config(cfg, recipe, target_config, aux)  # draft.init_from, before any group
    if cfg.train.sp_size > 1:
        from colocate.config import ConfigError

        try:
            recipe.check_sequence_parallel(target_config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return done, target_config, aux


def _check_gemms_under_sm_cap(cfg, topo, target_config, aux) -> None:
    """This rank's role under an MPS SM cap below 100: check the GEMM shapes it runs against
    float64 (gemm_check.py decides whether the check applies); raises ConfigError if wrong."""
    from colocate import gemm_check

    role = topo.role.value
    tokens = cfg.data.tokens_per_micro_step
    if topo.is_trainer:
        # Sequence parallel: each trainer of the group runs 1/sp_size of the rows.
        shapes = lambda: gemm_check.trainer_gemm_shapes(  # noqa: E731
            target_config, -(-tokens // cfg.train.sp_size),
            draft_vocab_size=cfg.draft.draft_vocab_size,
            draft_intermediate_size=cfg.draft.intermediate_size, num_aux=len(aux))
    else:
        shapes = lambda: gemm_check.engine_gemm_shapes(  # noqa: E731
            target_config, tokens, tp_size=cfg.engine.tp_size)
    gemm_check.check_sm_cap(role, getattr(cfg.mps, f"{role}_sm_percent"),
                            mps_active=bool(topo.mps_status and topo.mps_status.active),
                            device=topo.device, shapes=shapes)


def failure_summary(how: str) -> str | None:
    """The line the first trainer prints when the run ends early (cli.py); None elsewhere."""
    from colocate.train.signals import RUN

    return RUN.summary_line(how)


def _train(cfg, topo, session, target_config, aux, evals) -> None:
    import torch

    from colocate.train.run_dir import record_config
    from colocate.train.trainer import DraftTrainer

    if topo.device.type == "cuda" and cfg.mps.trainer_mem_fraction > 0:
        torch.cuda.set_per_process_memory_fraction(cfg.mps.trainer_mem_fraction, topo.device)
    trainer = DraftTrainer(cfg, topo, session, target_config=target_config, aux_layer_ids=aux,
                           evals=evals)
    if topo.is_first:  # accepted (resume checks passed): only now touch the run dir
        record_config(cfg, topo.info.num_pairs, topo.device.type, topo.num_nodes)
    trainer.train()
    out = trainer.export(os.path.join(cfg.run.dir, "export"))
    if out:
        log.info("exported the draft to %s", out)
    trainer.close()
