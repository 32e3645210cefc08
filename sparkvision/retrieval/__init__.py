"""Image retrieval: binary codes, FAISS indexes, similar-image search and near-duplicate detection.

The pieces, in the order a pipeline uses them::

    embed (sparkvision.inference.embed.embed_table) -> add_codes -> build_index -> SearchIndex / search_table
                                                      -> dedup_table (kNN candidates -> verify_pairs -> link_pairs)
"""

from typing import TYPE_CHECKING

from sparkvision.lazy import lazy_exports

# Loaded on first use, not on import: executors import submodules of this package (a sharded
# index's search task imports shard_search), and the eager imports pulled torch and the models
# into every such Python worker (~700 MB of RSS per task for nothing it runs).
_EXPORTS = {
    "DeepBitConfig": "codes",
    "DeepBitHead": "codes",
    "DeepBitLoss": "codes",
    "Hasher": "codes",
    "IndexChoice": "index",
    "SearchIndex": "search",
    "VerifyConfig": "verify",
    "add_codes": "embed",
    "build_index": "index",
    "choose_index": "index",
    "dedup_table": "dedup",
    "embed_with_codes": "embed",
    "fit_hasher": "codes",
    "itq": "codes",
    "keeper": "linking",
    "link_pairs": "linking",
    "lsh": "codes",
    "pack_bits": "codes",
    "search_df": "search",
    "search_images": "search",
    "search_table": "search",
    "train_deepbit": "codes",
    "union_find": "linking",
    "unpack_bits": "codes",
    "verify_pairs": "verify",
}

if TYPE_CHECKING:
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

__getattr__ = lazy_exports(__name__, _EXPORTS)


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
