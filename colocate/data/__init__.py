"""Data pipeline: JSONL conversations -> tokens + loss masks (cached) -> a deterministic,
sharded, resumable stream of packed micro-batches; plus the draft's reduced vocabulary.

Typical use on an engine rank::

    tokenized = load_or_build_tokenized(cfg.data, tokenizer, cfg.target.path, cache_dir)
    stream = DataStream(tokenized, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                        shard_index=i, num_shards=n,
                        tokens_per_micro_step=cfg.data.tokens_per_micro_step)
    batch = stream.next_micro_batch()
"""

from colocate.data.conversations import Conversation, Turn, parse_record, read_conversations
from colocate.data.errors import DataError
from colocate.data.packing import MicroBatch, pack_micro_batch
from colocate.data.sampler import ShardedSampler
from colocate.data.stats import DataStats
from colocate.data.stream import DataStream
from colocate.data.encode import Encoded, encode_conversation, encode_prompt
from colocate.data.template import Renderer, resolve_chat_template
from colocate.data.tokenized import TokenizedDataset, load_or_build_tokenized, renderer_for
from colocate.data.vocab import DraftVocab, load_or_build_vocab

__all__ = [
    "Conversation", "DataError", "DataStats", "DataStream", "DraftVocab", "MicroBatch",
    "ShardedSampler", "TokenizedDataset", "Turn", "load_or_build_tokenized", "load_or_build_vocab",
    "pack_micro_batch", "parse_record", "read_conversations", "resolve_chat_template",
    "Encoded", "Renderer", "encode_conversation", "encode_prompt", "renderer_for",
]
