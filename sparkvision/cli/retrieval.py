"""`sparkvision embed`, `index`, `search` and `dedup`: thin wrappers over :mod:`sparkvision.retrieval`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from sparkvision.cli.common import Conf, JsonOut, Master, console, emit, guarded, render_kv, spark_from


def embed(
    model: Annotated[str, typer.Argument(help="Model directory (from `sparkvision train` or `pretrain`).")],
    table: Annotated[str, typer.Argument(help="Image table to embed.")],
    out: Annotated[str, typer.Argument(help="Output features table (Parquet).")],
    bits: Annotated[
        int | None, typer.Option(help="Also add a binary `code` column of 32, 64 or 128 bits.")
    ] = None,
    code_method: Annotated[str, typer.Option(help="deepbit (learned, no labels) | itq | lsh.")] = "deepbit",
    sample: Annotated[int, typer.Option(help="Embeddings used to fit the codes (driver memory).")] = 100_000,
    split: Annotated[str | None, typer.Option(help="Only this split of the table.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call on the executors.")] = 512,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Extract L2-normalised backbone features of every image on the executors (and optionally codes)."""
    from sparkvision.retrieval.embed import embed_with_codes

    def body() -> dict[str, Any]:
        spark = spark_from(master, conf)
        return embed_with_codes(
            spark,
            model,
            table,
            out,
            bits=bits,
            method=code_method,
            sample=sample,
            split=split,
            batch_size=batch_size,
        )

    emit(guarded(body, json_out), json_out)


def index(
    features: Annotated[str, typer.Argument(help="Features table from `sparkvision embed`.")],
    index_dir: Annotated[str, typer.Argument(metavar="INDEX", help="Output index directory.")],
    kind: Annotated[
        str, typer.Option(help="auto | flat | ivf | ivfpq | hnsw | binary_flat | binary_ivf.")
    ] = "auto",
    codes: Annotated[bool, typer.Option("--codes", help="Index the binary `code` column (Hamming).")] = False,
    nprobe: Annotated[
        int | None, typer.Option(help="IVF lists searched per query (default: chosen).")
    ] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW efSearch (default 64).")] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Build a FAISS index from a features table, one Parquet shard at a time; says which and why."""
    from sparkvision.spark.progress import step_progress
    from sparkvision.retrieval.index import build_index, count_rows

    def body() -> dict[str, Any]:
        params: dict[str, int] = {}
        if nprobe is not None:
            params["nprobe"] = nprobe
        if ef_search is not None:
            params["efSearch"] = ef_search
        with step_progress("index", count_rows(features)) as advance:
            return build_index(
                features,
                index_dir,
                column="code" if codes or kind.startswith("binary") else None,
                kind=kind.removeprefix("binary_") if codes else kind,
                params=params,
                progress=lambda n, note: advance(n, note),
            )

    emit(guarded(body, json_out), json_out)


def _render_search(s: dict[str, Any]) -> None:
    if "results" not in s:
        render_kv(s)
        return
    for q in s["results"]:
        if q["error"]:
            console.print(f"[red]{q['query']}[/red]: {q['error']}")
            continue
        t = Table(title=q["query"])
        for col in ("rank", "score", "path", "label", "content_id"):
            t.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for h in q["neighbours"]:
            t.add_row(
                str(h["rank"]),
                f"{h['score']:.4f}",
                str(h["path"]),
                str(h["label_name"] or ""),
                h["content_id"][:12],
            )
        console.print(t)


def search(
    index_dir: Annotated[
        str, typer.Argument(metavar="INDEX", help="Index directory from `sparkvision index`.")
    ],
    images: Annotated[list[str] | None, typer.Argument(metavar="IMAGE...", help="Query image files.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 10,
    model: Annotated[
        str | None, typer.Option(help="Model directory (default: the one that built the index).")
    ] = None,
    table: Annotated[
        str | None,
        typer.Option(help="Batch mode: search every row of this image or features table on the executors."),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Batch mode output (Parquet), one row per (query, neighbour).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Batch mode: only this split.")] = None,
    nprobe: Annotated[
        int | None, typer.Option(help="IVF lists searched per query (overrides the index's).")
    ] = None,
    exclude_self: Annotated[
        bool, typer.Option("--exclude-self", help="Batch mode: drop a query's own row.")
    ] = False,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Nearest neighbours of image files (or of every row of a table) with scores and paths."""
    from sparkvision.retrieval.search import search_images, search_table

    def body() -> dict[str, Any]:
        if table is not None:
            if out is None:
                raise ValueError("--table needs --out for the results table")
            spark = spark_from(master, conf)
            return search_table(
                spark,
                index_dir,
                table,
                out,
                k=k,
                model_dir=model,
                split=split,
                nprobe=nprobe,
                exclude_self=exclude_self,
            )
        if not images:
            raise ValueError("give one or more IMAGE files, or --table TABLE --out OUT for batch mode")
        return {
            "index": index_dir,
            "k": k,
            "results": search_images(index_dir, list(images), k, model, nprobe),
        }

    emit(guarded(body, json_out), json_out, _render_search)


def dedup(
    table: Annotated[str, typer.Argument(help="Image table.")],
    out: Annotated[
        str, typer.Argument(help="Output directory: groups.parquet, _dedup.json and the scored _pairs.")
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Model directory whose embeddings propose candidates (default: pixel descriptor)."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Verify each candidate pair by aligning the two images and comparing pixels "
            "(robust to flips, shifts, small rotations and scaling, blur, tone changes, JPEG). "
            "--no-verify links on the descriptor's cosine alone.",
        ),
    ] = True,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Score that makes a near-duplicate: the verification score in [0, 1] (default 0.995), "
            "or with --no-verify the cosine similarity (default 0.97 pixels, 0.95 model).",
        ),
    ] = None,
    link: Annotated[
        str,
        typer.Option(
            help="mutual: a verified pair >= --threshold links only if each image is the other's best "
            "match (stops look-alikes joining); all: every pair >= --threshold links.",
        ),
    ] = "mutual",
    strict_threshold: Annotated[
        float | None,
        typer.Option(help="With --link mutual: pairs scoring at least this always link (default 0.998)."),
    ] = None,
    candidate_threshold: Annotated[
        float | None,
        typer.Option(
            help="With verification: cosine a neighbour needs to become a candidate (default 0.9 pixels, "
            "0.8 model); it only bounds the work."
        ),
    ] = None,
    verify_size: Annotated[
        int, typer.Option(help="Side in pixels of the grayscale thumbnails compared in verification.")
    ] = 32,
    keep: Annotated[str, typer.Option(help="Which member to keep: largest | earliest.")] = "largest",
    k: Annotated[
        int, typer.Option("-k", "--k", help="Neighbours compared per image (groups grow transitively).")
    ] = 16,
    exact_only: Annotated[
        bool, typer.Option("--exact-only", help="Only identical bytes (content id).")
    ] = False,
    split: Annotated[str | None, typer.Option(help="Only this split.")] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Find exact and near-duplicate images, group them transitively and mark one per group to keep.

    Near-duplicates: kNN candidates by descriptor similarity, then (by default) each candidate pair
    is aligned and verified on the executors. See docs/retrieval.md for calibrating the thresholds.
    """
    from sparkvision.spark.progress import step_progress
    from sparkvision.retrieval.dedup import dedup_table

    def body() -> dict[str, Any]:
        spark = spark_from(master, conf)
        with step_progress("dedup: search", None) as advance:
            return dedup_table(
                spark,
                table,
                out,
                model_dir=model,
                threshold=threshold,
                keep=keep,
                split=split,
                k=k,
                exact_only=exact_only,
                verify=verify,
                candidate_threshold=candidate_threshold,
                link=link,
                strict_threshold=strict_threshold,
                verify_size=verify_size,
                progress=lambda n, note: advance(n, note),
            )

    emit(guarded(body, json_out), json_out)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
    app.command("index")(index)
    app.command("search")(search)
    app.command("dedup")(dedup)
