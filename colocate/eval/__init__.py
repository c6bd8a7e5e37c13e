"""`colocate eval`: the acceptance length an exported draft gets when it is served.

* `chain`: greedy chain speculative decoding as a loop over two callables (propose, verify),
  with sglang's accounting (accept length, histogram); no model inside.
* `reference`: the plain-torch decoder (transformers target with a KV cache, the project's own
  `Eagle3Draft` modules run incrementally); CPU, CI, any device.
* `sglang_eval`: the same numbers from sglang's own speculative decoder (GPU only).
* `command`: the CLI (`python -m colocate eval`).
"""
