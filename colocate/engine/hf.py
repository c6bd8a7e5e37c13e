"""The transformers backend: the reference engine, on any device.

Runs only the base model (`model.model`: embeddings, decoder layers, final norm; the trainer
applies lm_head itself) on the packed micro-batch as ONE sequence [1, T], with
`position_ids` restarting at 0 for every packed sequence, no attention mask and no cache.
transformers (5.x, `masking_utils.find_packed_sequence_indices`) then detects the packing
from the position ids (a new sequence wherever a position is not its predecessor + 1) and
builds a block-diagonal causal mask, so packed sequences do not attend to each other. It
does so only when `attention_mask` is None AND there is no cache: `use_cache=False` is
load-bearing (with a cache the packing check is skipped and the mask is plain causal).
tests/unit/test_engine_hf.py proves the isolation against per-sequence forwards.

Attention implementation (`pick_attn_implementation`):
* sdpa (default on CPU): the packed mask is materialised densely, [1, 1, T, T] bools, and a
  masked sdpa cannot use the flash kernel. Fine for CPU and short micro-steps; quadratic
  time and memory for long ones (tiny target on an H200, two sequences of 6000 tokens:
  0.5 s and 0.5 GiB peak per prefill, against 0.016 s and 0.1 GiB with flex).
* flex_attention (preferred on CUDA): the packed mask becomes a block-sparse BlockMask, so
  cross-sequence blocks are skipped rather than masked. Costs torch.compile time on the
  first prefills (seen with torch 2.11 / transformers 5.17: about 15-20 s for each of the
  first few token counts, then the compiled graph is dynamic and new counts up to 12000
  compiled nothing more); run.startup_timeout_s covers it.
* eager: the same dense mask as an additive float mask; for debugging only.
* flash_attention_2/3 also find the boundaries from position_ids (varlen) and may be passed
  explicitly when the flash-attn package is installed.
All of sdpa, eager and flex matched per-sequence forwards (fp32: within 3e-6).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from colocate.engine.base import TargetEngine, resolve_aux_layer_ids
from colocate.target import check_model_dir


def pick_attn_implementation(device: torch.device) -> str:
    """flex_attention on CUDA when this torch has it (block-sparse packed mask), else sdpa."""
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            return "flex_attention"
        except ImportError:
            pass
    return "sdpa"


def _dtype_kwarg() -> str:
    # transformers renamed from_pretrained's `torch_dtype` to `dtype` (4.56); 5.x still
    # accepts the old name with a deprecation warning, older releases only know it.
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """AutoModelForCausalLM from a local directory, in `dtype`, on the CPU."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    kwargs = {_dtype_kwarg(): dtype, "attn_implementation": attn_implementation}
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)


def dummy_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str,
                    device: torch.device, seed: int) -> nn.Module:
    """target.load_format=dummy: the architecture of path/config.json with random weights,
    initialised directly on `device` (an 8B model in seconds, no checkpoint needed). The
    input embedding is the trainer's (`target.dummy_embed`), so both sides agree."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from colocate.target import dummy_embed

    check_model_dir(path, need_weights=False)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{_dtype_kwarg(): dtype})
    text = config.get_text_config()
    embed = dummy_embed(text.vocab_size, text.hidden_size, seed=seed, dtype=dtype,
                        device=device)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embed)
    return model


class HFTargetEngine(TargetEngine):
    """transformers prefill with forward hooks on the aux layers and the final norm."""

    def __init__(self, path: str, *, dtype: torch.dtype, device: torch.device,
                 aux_layer_ids: list[int] | None = None, default_layer_ids=None,
                 attn_implementation: str | None = None,
                 load_format: str = "auto", seed: int = 0):
        device = torch.device(device)
        attn = attn_implementation or pick_attn_implementation(device)

        def load(attn: str) -> nn.Module:
            if load_format == "dummy":
                return dummy_causal_lm(path, dtype, attn, device, seed)
            return load_causal_lm(path, dtype, attn)

        try:
            model = load(attn)
        except (ValueError, ImportError) as e:
            if attn_implementation is not None or attn == "sdpa" or "target.path" in str(e):
                raise
            # The model class or this torch lacks flex attention: sdpa is always there.
            warnings.warn(f"{path}: attention {attn!r} unavailable ({e}); using sdpa, which "
                          "builds a dense [T, T] mask for packed sequences")
            attn = "sdpa"
            model = load(attn)
        model.requires_grad_(False).eval().to(device)
        self.model = model
        self.attn_implementation = attn
        # The base model (embeddings, layers, final norm); lm_head is the trainer's business.
        self.base = model.base_model
        text_config = model.config.get_text_config()
        self._hidden_size = int(text_config.hidden_size)
        self._vocab_size = int(text_config.vocab_size)
        self._dtype = dtype
        self._device = device
        layers, norm = getattr(self.base, "layers", None), getattr(self.base, "norm", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
            raise ValueError(f"target.path: {path!r} ({type(model).__name__}) has no "
                             "`model.layers` / `model.norm`; the hf engine supports "
                             "Llama-style decoder models")
        self._num_layers = len(layers)
        self._aux_layer_ids = resolve_aux_layer_ids(aux_layer_ids, self._num_layers,
                                                    default=default_layer_ids)
        # Filled per prefill: where each hook writes; None outside prefill (hooks idle).
        self._targets: dict[str, list[torch.Tensor]] | None = None
        self._fired: set[str] = set()
        for layer_id in sorted(set(self._aux_layer_ids)):
            layers[layer_id].register_forward_hook(self._hook(f"layer{layer_id}"))
        norm.register_forward_hook(self._hook("norm"))


    # ------------------------------------------------------------------ capture

    def _hook(self, key: str):
        def hook(module: nn.Module, args, output) -> None:
            if self._targets is None or key not in self._targets:
                return
            # transformers 5 decoder layers return the hidden states tensor; 4.x returned
            # a tuple (hidden_states, ...). Accept both.
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            for view in self._targets[key]:
                view.copy_(hidden[0])  # [1, T, H] -> [T, H], straight into the slot
            self._fired.add(key)
        return hook

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 aux_out: torch.Tensor, last_out: torch.Tensor | None) -> None:
        h = self.hidden_size
        targets: dict[str, list[torch.Tensor]] = {"norm": [last_out]} if last_out is not None \
            else {}
        for i, layer_id in enumerate(self._aux_layer_ids):
            # A repeated id (Eagle3's default repeats for shallow targets) fills both columns.
            targets.setdefault(f"layer{layer_id}", []).append(aux_out[:, i * h:(i + 1) * h])
        self._targets, self._fired = targets, set()
        try:
            # One packed row; attention_mask=None and use_cache=False are what make
            # transformers derive the per-sequence mask from position_ids (module docstring).
            self.base(input_ids=input_ids[None], position_ids=positions[None],
                      attention_mask=None, use_cache=False)
        finally:
            self._targets = None
        missing = set(targets) - self._fired
        assert not missing, f"hooks did not fire for {sorted(missing)}"
