"""Corpus preparation and batching.

`prepare` turns text files into a directory of flat token arrays (train.bin, val.bin), a meta.json
describing them and the tokenizer that made them. `TokenDataset` memory-maps those arrays, so
training reads random windows from a corpus of any size without loading it.
"""

from .dataset import SPLITS, TokenDataset
from .inputs import default_corpus_files, resolve_inputs
from .prepare import prepare

__all__ = ["SPLITS", "TokenDataset", "default_corpus_files", "prepare", "resolve_inputs"]
