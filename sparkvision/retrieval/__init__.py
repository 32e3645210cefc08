"""Image retrieval: binary codes, FAISS indexes, similar-image search and near-duplicate detection.

The pieces, in the order a pipeline uses them::

    embed (sparkvision.inference.embed.embed_table) -> add_codes -> build_index -> SearchIndex / search_table
                                                      -> dedup_table (kNN candidates -> verify_pairs -> link_pairs)
"""

from sparkvision.retrieval.codes import (
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
from sparkvision.retrieval.dedup import dedup_table
from sparkvision.retrieval.embed import add_codes, embed_with_codes
from sparkvision.retrieval.index import IndexChoice, build_index, choose_index
from sparkvision.retrieval.linking import keeper, link_pairs, union_find
from sparkvision.retrieval.search import SearchIndex, search_df, search_images, search_table
from sparkvision.retrieval.verify import VerifyConfig, verify_pairs

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
    "link_pairs",
    "lsh",
    "pack_bits",
    "search_df",
    "search_images",
    "search_table",
    "train_deepbit",
    "union_find",
    "unpack_bits",
    "verify_pairs",
    "VerifyConfig",
]
