"""`colocate eval`: the acceptance length an exported draft gets when it is served.

* `chain`: greedy speculative decoding as a loop over four callables (prefill, propose,
  verify, commit), with sglang's accounting (accept length, histogram); no model inside.
* `methods`: the one place that maps an export (config.json's architectures) to how it is
  served: Eagle3 (a chain, sglang EAGLE3) or DFlash (a block, sglang DFLASH).
* `reference`: the plain-torch decoder (transformers target with a KV cache, the project's own
  `Eagle3Draft` modules run incrementally); CPU, CI, any device.
* `block`: the reference decoder's DFlash drafter (`DFlashDraft`, one block per verify step).
* `sglang_eval`: the same numbers from sglang's own speculative decoder (GPU only).
* `command`: the CLI (`python -m colocate eval`).
"""
