"""Image retrieval: binary codes, FAISS indexes, similar-image search and near-duplicate detection.

The pieces, in the order a pipeline uses them::

    embed (sparkvision.infer.embed_table) -> add_codes -> build_index -> SearchIndex / search_table
                                                        -> dedup_table
"""

from .codes import (
    DeepBitConfig,
    DeepBitHead,
    DeepBitLoss,
    Hasher,
    fit_hasher,
    itq,
    lsh,
    pack_bits,
    train_deepbit,
    unpack_bits,
)
from .dedup import dedup_table, keeper, union_find
from .embed import add_codes, embed_with_codes
from .index import IndexChoice, build_index, choose_index
from .search import SearchIndex, search_df, search_images, search_table

__all__ = [
    "DeepBitConfig",
    "DeepBitHead",
    "DeepBitLoss",
    "Hasher",
    "IndexChoice",
    "SearchIndex",
    "add_codes",
    "build_index",
    "choose_index",
    "dedup_table",
    "embed_with_codes",
    "fit_hasher",
    "itq",
    "keeper",
    "lsh",
    "pack_bits",
    "search_df",
    "search_images",
    "search_table",
    "train_deepbit",
    "union_find",
    "unpack_bits",
]
