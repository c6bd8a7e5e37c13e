"""`colocate generate`: a dataset's assistant turns rewritten as the target's own answers.

A draft learns to predict the target, so it should be trained on what the target says: on
the H200 a draft trained on a dataset's own answers got a served accept length of 1.18, one
trained on the target's greedy answers 2.36 (DESIGN.md section 8). And on the target's own
token ids, not on text: decoded text does not always tokenize back to the ids the target
produced, and a draft trained on re-tokenized text learns what the target never says.

Modules: `engines` (hf and sglang backends behind one interface), `rewrite` (a chunk of
records regenerated turn by turn, counts), `store` (part files, resume, the final file),
`run` (one run), `command` (the CLI).
"""
