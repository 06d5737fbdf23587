"""Corpus preparation and batching.

`prepare` streams a corpus (text, JSON lines, CSV, Parquet, compressed or not, or a Hugging Face
dataset) through worker processes into token shards per split, with a meta.json listing them and
the tokenizer that made them. `TokenDataset` memory-maps the shards, so training reads random
windows from a corpus of any size without loading it.

Modules: `inputs` (which sources), `readers` (one per format), `workers` (tokenising on every core),
`shards` (writing a split), `output` (what may be written where), `pipeline` (prepare itself),
`layout` (the directory's format), `dataset` (reading it back).
"""

from .dataset import TokenDataset, TokenSplit
from .inputs import default_corpus_files, resolve_inputs
from .layout import SPLITS
from .pipeline import DEFAULT_SHARD_TOKENS, prepare

__all__ = ["DEFAULT_SHARD_TOKENS", "SPLITS", "TokenDataset", "TokenSplit", "default_corpus_files", "prepare",
           "resolve_inputs"]
