"""Corpus preparation and batching.

`prepare` streams a corpus (text, JSON lines, CSV, Parquet, compressed or not, or a Hugging Face
dataset) through worker processes into token shards per split, with a meta.json listing them and
the tokenizer that made them. `TokenDataset` memory-maps the shards, so training reads random
windows from a corpus of any size without loading it.

Modules: `inputs` (which sources), `readers` (one per format), `workers` (tokenising on every core),
`shards` (writing a split), `output` (what may be written where), `pipeline` (prepare itself),
`layout` (the directory's format), `dataset` (reading it back).
"""

from ..lazy import lazy_attributes

_EXPORTS = {
    "TokenDataset": ".dataset", "TokenSplit": ".dataset", "default_corpus_files": ".inputs",
    "resolve_inputs": ".inputs", "SPLITS": ".layout", "DEFAULT_SHARD_TOKENS": ".pipeline", "prepare": ".pipeline",
}
__all__ = sorted(_EXPORTS)
# prepare needs no torch, and neither do the workers it forks: only TokenDataset imports it
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
