"""Run configuration: nested dataclasses loaded from YAML plus dotted ``key=value`` overrides.

Every field is documented right under it, in the module of its section:
colocate/config/job.py (run, mps, transport, target, engine), learning.py (data, draft,
train, metrics, checkpoint) and commands.py (bench, generate, eval); parse.py reads YAML and
overrides into them. Each section validates itself in
``__post_init__``; cross-section checks live in ``Config.__post_init__``. User mistakes raise
``ConfigError`` (a ``ValueError``) naming the dotted key and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from colocate.config.commands import KV_CACHE_DTYPES, BenchSection, EvalSection, GenerateSection
from colocate.config.job import (EngineSection, MpsSection, RunSection, TargetSection,
                                 TransportSection)
from colocate.config.learning import (METHOD_ONLY_DRAFT_KEYS, TRACKERS, CheckpointSection,
                                      DataSection, DraftSection, MetricsSection, TrainSection,
                                      warn_other_method_keys)
from colocate.config.parse import (ConfigError, build, describe_path, float_arg, int_arg,
                                   parse_override, require, user_number, yaml_load)

__all__ = ["KV_CACHE_DTYPES", "METHOD_ONLY_DRAFT_KEYS", "TRACKERS", "BenchSection",
           "CheckpointSection", "Config", "ConfigError", "DataSection", "DraftSection",
           "EngineSection", "EvalSection", "GenerateSection", "MetricsSection", "MpsSection",
           "RunSection", "TargetSection", "TrainSection", "TransportSection", "describe_path",
           "float_arg", "int_arg", "load_config", "parse_override", "save_config",
           "user_number"]


@dataclass(kw_only=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    mps: MpsSection = field(default_factory=MpsSection)
    transport: TransportSection = field(default_factory=TransportSection)
    target: TargetSection = field(default_factory=TargetSection)
    engine: EngineSection = field(default_factory=EngineSection)
    data: DataSection = field(default_factory=DataSection)
    draft: DraftSection = field(default_factory=DraftSection)
    train: TrainSection = field(default_factory=TrainSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    bench: BenchSection = field(default_factory=BenchSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        if self.train.tensorboard:  # the old switch, migrated (the saved config has the new one)
            warnings.warn("train.tensorboard is deprecated: use metrics.report_to: "
                          "[jsonl, tensorboard] (train.tensorboard=true adds it for now)",
                          FutureWarning, stacklevel=2)
            if "tensorboard" not in self.metrics.report_to:
                self.metrics.report_to.append("tensorboard")
            self.train.tensorboard = False
        require(self.engine.backend != "sglang" or self.run.device != "cpu", "engine.backend",
                 "sglang needs CUDA; use engine.backend=hf with run.device=cpu")
        require(self.engine.quantization == "none" or self.engine.backend == "sglang",
                 "engine.quantization", f"{self.engine.quantization} needs engine.backend=sglang "
                 "(the hf engine runs the target in target.dtype); use engine.quantization=none")
        require(self.engine.tp_size == 1 or self.engine.backend == "sglang", "engine.tp_size",
                 f"{self.engine.tp_size} needs engine.backend=sglang (the hf engine runs the "
                 "whole target on each engine rank); use engine.tp_size=1")
        sp = self.train.sp_size
        require(sp == 1 or self.data.source == "dataset", "train.sp_size",
                 f"{sp} with data.source=generate: online decode is not sequence-parallel yet "
                 "(every engine of a group would answer the same prompts); pre-generate the "
                 "answers with `colocate generate` and train on the file, or use train.sp_size=1")
        require(sp == 1 or self.engine.backend == "hf" or self.engine.tp_size == sp,
                 "engine.tp_size", f"{self.engine.tp_size} with train.sp_size={sp}: the sglang "
                 "engines of one sequence-parallel group prefill each sequence together as one "
                 f"tensor-parallel group; set engine.tp_size={sp}")
        require(not (self.train.epochs and self.data.source == "generate"), "train.epochs",
                 "online decode (data.source=generate) cannot count its micro-batches ahead: "
                 "its answers do not exist yet; set train.max_steps instead")
        require(self.eval.engine not in ("sglang", "both") or self.run.device != "cpu",
                 "eval.engine", f"{self.eval.engine} needs CUDA; use eval.engine=hf with "
                 "run.device=cpu")

    def check_training(self) -> None:
        """What only `colocate train` needs (eval and generate read the same file and may
        turn the held-out split off)."""
        require(bool(self.train.max_steps or self.train.epochs), "train.max_steps",
                 "neither it nor train.epochs is set; set one of them, e.g. "
                 "train.max_steps=1000 or train.epochs=2")
        require(self.train.val_every_steps == 0 or self.data.holdout > 0,
                 "train.val_every_steps", "validation needs held-out conversations; set "
                 "data.holdout (e.g. 48) or train.val_every_steps=0")
        for name in self.metrics.report_to:
            # find_spec looks for the package without importing it (wandb takes a second).
            package = TRACKERS[name]
            require(package is None or importlib.util.find_spec(package) is not None,
                     "metrics.report_to", f"{name} needs the {package} package, which is not "
                     f"installed: pip install 'colocate[{name}]' (or drop {name} from "
                     "metrics.report_to)")

    @property
    def last_step(self) -> int:
        """Optimizer steps this invocation runs up to (stop_at_step, or the run's total)."""
        return self.train.stop_at_step or self.train.total_steps

    def to_dict(self) -> dict[str, Any]:
        # Through JSON so tuples become lists and the result is plain YAML.
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Load YAML (optional), apply dotted overrides, validate, and return a Config."""
    values: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {describe_path(path)}: no such file")
        with open(path) as f:
            try:
                loaded = yaml_load(f)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        values = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            require(isinstance(node, dict), ".".join(keys[: i + 1]), "is not a section")
        node[keys[-1]] = value
    try:
        config = build(Config, values, "")
    except TypeError as e:  # a missing section type or similar programming slip
        raise ConfigError(str(e)) from None
    warn_other_method_keys(config.draft)
    return config


def save_config(config: Config, path: str) -> None:
    """Write the resolved config as YAML (atomic)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
