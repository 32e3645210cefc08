"""Retrieval benchmark (issue 5): mAP@100 on Fashion-MNIST, test split as queries, train split as
the database, same class = relevant.

Compared: raw pixels (float and 64-bit LSH), supervised CNN features (float, and 64-bit codes from
DeepBit, ITQ and LSH fitted on them, all without labels), and self-supervised features when a
pretrained encoder directory exists (skipped with a note otherwise). CNN / SSL features come from
``embed_table`` on Spark (the real pipeline). The DeepBit head's augmented view is the encoder's
features of the same train images rotated by a random angle in [-10, 10] degrees (DeepBit's
rotation invariance), computed here with the same model.

AP@100 is the usual hashing-literature definition: mean over the top 100 of precision@i at each
relevant position i, divided by the number of relevant items in the top 100 (0 if none).

Targets: learned 64-bit codes >= 2x the mAP of LSH on pixels, and >= 90% of their float features.

    .venv/bin/python benchmarks/bench_retrieval.py [--table data/fashion-mnist] [--model runs/bench-cnn]
        [--ssl runs/bench-ssl] [--ssl-label "self-supervised"]

To add rows to an earlier run without recomputing it (the 2-core machine is shared), ``--merge``
keeps the rows already in ``results/retrieval.json`` and ``--skip pixels,supervised`` leaves those
parts out, e.g. only the self-supervised rows::

    .venv/bin/python benchmarks/bench_retrieval.py --merge --skip pixels,supervised \
        --ssl /tmp/ssl-1ep --ssl-label "self-supervised (improved SimCLR, 1 epoch)" --deepbit-bits 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow.dataset as pads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparkvision.retrieval.codes import DeepBitConfig, itq, lsh, train_deepbit  # noqa: E402
from sparkvision.retrieval.index import vectors_of  # noqa: E402


def average_precision_at_k(relevant: np.ndarray, strict: bool = False) -> np.ndarray:
    """``relevant (Q, k)`` bool -> AP@k per query.

    Default: the hashing-literature definition (divide by the relevant items retrieved in the top
    k). ``strict``: divide by min(R, k) = k here (every class has 6,000 >= 100 database items), so
    a list with few relevant items scores low even if they come first.
    """
    rel = relevant.astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = np.cumsum(rel, 1) / ranks
    hits = rel.sum(1)
    if strict:
        return (prec * rel).sum(1) / rel.shape[1]
    return np.where(hits > 0, (prec * rel).sum(1) / np.maximum(hits, 1), 0.0)


STRICT: dict[str, float] = {}  # method -> strict mAP@100 of the last evaluation


def _both(relevant: np.ndarray) -> float:
    STRICT["last"] = float(average_precision_at_k(relevant, strict=True).mean())
    return float(average_precision_at_k(relevant).mean())


def map_float(db: np.ndarray, q: np.ndarray, db_y: np.ndarray, q_y: np.ndarray, k: int = 100) -> float:
    import faiss

    idx = faiss.IndexFlatIP(db.shape[1])
    idx.add(np.ascontiguousarray(db, np.float32))
    _, rows = idx.search(np.ascontiguousarray(q, np.float32), k)
    return _both(db_y[rows] == q_y[:, None])


def map_codes(db: np.ndarray, q: np.ndarray, db_y: np.ndarray, q_y: np.ndarray, k: int = 100) -> float:
    import faiss

    idx = faiss.IndexBinaryFlat(db.shape[1] * 8)
    idx.add(np.ascontiguousarray(db))
    _, rows = idx.search(np.ascontiguousarray(q), k)
    return _both(db_y[rows] == q_y[:, None])


def load_split(
    features: str, split: str, column: str = "embedding"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    t = pads.dataset(features.replace("file://", ""), format="parquet").to_table(
        filter=pads.field("split") == split, columns=["content_id", "label", column]
    )
    t = t.sort_by("content_id")
    return vectors_of(t, column), t.column("label").to_numpy(), t.column("content_id").to_pylist()


def pixels(table: str, split: str) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    from sparkvision.transforms.preprocess import decode_image

    t = (
        pads.dataset(table, format="parquet")
        .to_table(filter=pads.field("split") == split, columns=["content_id", "label", "image"])
        .sort_by("content_id")
    )
    imgs = t.column("image").to_pylist()
    x = np.stack([decode_image(b, 1).reshape(-1) for b in imgs]).astype(np.float32) / 255
    return x, t.column("label").to_numpy(), imgs


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rotated_features(model_dir: str, images: list[bytes], seed: int = 0) -> np.ndarray:
    """The encoder's features of each image rotated by U(-10, 10) degrees (DeepBit's view)."""
    import io

    import torch
    from PIL import Image

    from sparkvision.inference.runtime import FeatureModel
    from sparkvision.models.modeldir import load_model_dir
    from sparkvision.transforms.preprocess import preprocess_batch

    lm = load_model_dir(model_dir)
    net = FeatureModel(lm.model).eval()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(images), 1024):
        batch = []
        for b in images[i : i + 1024]:
            im = Image.open(io.BytesIO(b)).rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            batch.append(buf.getvalue())
        x, _ = preprocess_batch(batch, lm.preprocess)
        with torch.inference_mode():
            out.append(net(x.contiguous()).numpy())
    return np.concatenate(out)


def embed(spark, model_dir: str, table: str, out: str) -> dict:
    from sparkvision.inference.embed import embed_table

    if os.path.exists(os.path.join(out, "_SUCCESS")):
        return {"reused": out}
    return embed_table(spark, model_dir, table, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--model", default="runs/bench-cnn")
    ap.add_argument("--ssl", default="runs/bench-ssl")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--deepbit-bits", default="32,64,128", help="code lengths for the DeepBit rows")
    ap.add_argument("--ssl-label", default="self-supervised", help="name of the SSL rows")
    ap.add_argument("--skip", default="", help="comma list of parts to leave out: pixels, supervised")
    ap.add_argument("--merge", action="store_true", help="keep the other rows of results/retrieval.json")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "retrieval"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_all = time.perf_counter()
    bits = args.bits
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    rows: list[dict] = []
    notes: list[str] = []
    previous: dict = {}
    if args.merge and os.path.exists(os.path.join(args.results, "retrieval.json")):
        with open(os.path.join(args.results, "retrieval.json")) as f:
            previous = json.load(f)

    def record(name: str, features: str, kind: str, m: float, t: float, **extra) -> None:
        strict = STRICT["last"]
        rows.append(
            {
                "method": name,
                "features": features,
                "kind": kind,
                "map@100": round(m, 4),
                "strict_map@100": round(strict, 4),
                "seconds": round(t, 1),
                **extra,
            }
        )
        print(f"{name:32s} {kind:12s} mAP@100 {m:.4f} strict {strict:.4f} ({t:.1f}s)", flush=True)

    # --- raw pixels ---------------------------------------------------------------------------
    if "pixels" in skip:
        prev = {r["method"]: r for r in previous.get("rows", [])}
        lsh_row = prev.get(f"LSH-{bits} on pixels")
        if lsh_row is None:
            raise SystemExit("--skip pixels needs --merge and an earlier LSH-on-pixels row")
        m_lsh_px, s_lsh_px = lsh_row["map@100"], lsh_row["strict_map@100"]
    else:
        m_lsh_px, s_lsh_px = pixel_rows(args.table, bits, record)

    # --- encoders: supervised CNN, and self-supervised if present --------------------------------
    from sparkvision.spark.session import get_spark

    spark = get_spark()
    encoders = [] if "supervised" in skip else [("supervised CNN", args.model)]
    if os.path.exists(os.path.join(args.ssl, "model.safetensors")):
        encoders.append((args.ssl_label, args.ssl))
    else:
        notes.append(f"self-supervised features skipped: no pretrained encoder at {args.ssl}")
    targets = dict(previous.get("targets", {})) if previous else {}
    for label, model_dir in encoders:
        run_encoder(spark, args, label, model_dir, bits, m_lsh_px, s_lsh_px, record, targets)
    if previous:
        fresh = {r["method"] for r in rows}
        rows[:0] = [r for r in previous.get("rows", []) if r["method"] not in fresh]
        notes = [
            n
            for n in previous.get("notes", [])
            if "self-supervised features skipped" not in n and "added with --merge" not in n
        ] + notes
        notes.append(
            f"rows for {', '.join(label for label, _ in encoders) or 'nothing'} added with --merge to an earlier "
            f"run ({', '.join(f'{label}: {d}' for label, d in encoders)}); total_s covers this run only"
        )
    write_results(args, bits, rows, targets, notes, t_all)


def pixel_rows(table: str, bits: int, record) -> tuple[float, float]:
    t0 = time.perf_counter()
    px_db, y_db, _ = pixels(table, "train")
    px_q, y_q, _ = pixels(table, "test")
    record(
        "pixels (float, cosine)",
        "pixels",
        "float 784-d",
        map_float(l2n(px_db), l2n(px_q), y_db, y_q),
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    h = lsh(px_db.shape[1], bits, mean=px_db.mean(0))
    m_lsh_px = map_codes(h.encode(px_db), h.encode(px_q), y_db, y_q)
    s_lsh_px = STRICT["last"]
    record(f"LSH-{bits} on pixels", "pixels", f"{bits}-bit", m_lsh_px, time.perf_counter() - t0)
    t0 = time.perf_counter()
    h = itq(px_db, bits)
    record(
        f"ITQ-{bits} on pixels",
        "pixels",
        f"{bits}-bit",
        map_codes(h.encode(px_db), h.encode(px_q), y_db, y_q),
        time.perf_counter() - t0,
    )

    return m_lsh_px, s_lsh_px


def run_encoder(spark, args, label, model_dir, bits, m_lsh_px, s_lsh_px, record, targets) -> None:
    """Float, LSH, ITQ and DeepBit rows for one encoder's features (embedded on Spark)."""
    t0 = time.perf_counter()
    feat_dir = os.path.join(args.out, os.path.basename(model_dir.rstrip("/")) + "-features")
    es = embed(spark, model_dir, os.path.abspath(args.table), feat_dir)
    f_db, fy_db, ids_db = load_split(feat_dir, "train")
    f_q, fy_q, _ = load_split(feat_dir, "test")
    t_embed = time.perf_counter() - t0
    m_float = map_float(f_db, f_q, fy_db, fy_q)
    s_float = STRICT["last"]
    record(f"{label} features (float)", label, f"float {f_db.shape[1]}-d", m_float, t_embed, embed=es)
    t0 = time.perf_counter()
    h = lsh(f_db.shape[1], bits, mean=f_db.mean(0))
    record(
        f"LSH-{bits} on {label}",
        label,
        f"{bits}-bit",
        map_codes(h.encode(f_db), h.encode(f_q), fy_db, fy_q),
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    h = itq(f_db, bits)
    m_itq = map_codes(h.encode(f_db), h.encode(f_q), fy_db, fy_q)
    record(f"ITQ-{bits} on {label}", label, f"{bits}-bit", m_itq, time.perf_counter() - t0)
    # DeepBit: rotated views of a 20k subset of the train split (no labels used)
    t0 = time.perf_counter()
    t = (
        pads.dataset(args.table, format="parquet")
        .to_table(filter=pads.field("split") == "train", columns=["content_id", "image"])
        .sort_by("content_id")
    )
    assert t.column("content_id").to_pylist() == ids_db
    train_imgs = t.column("image").to_pylist()
    sub = np.random.default_rng(0).choice(len(f_db), 20_000, replace=False)
    f_rot = rotated_features(model_dir, [train_imgs[i] for i in sub])
    t_rot = time.perf_counter() - t0
    for nb in sorted({bits, *(int(v) for v in args.deepbit_bits.split(","))}):
        t0 = time.perf_counter()
        h, last = train_deepbit(f_db[sub], f_rot, DeepBitConfig(bits=nb, epochs=args.epochs))
        m = map_codes(h.encode(f_db), h.encode(f_q), fy_db, fy_q)
        sm = STRICT["last"]
        bal = np.unpackbits(h.encode(f_db), axis=1).mean(0)
        record(
            f"DeepBit-{nb} on {label}",
            label,
            f"{nb}-bit",
            m,
            time.perf_counter() - t0 + t_rot,
            bit_balance=[round(float(bal.min()), 3), round(float(bal.max()), 3)],
            final_loss=last,
        )
        if nb == bits:
            targets[label] = {
                "deepbit_map": round(m, 4),
                "float_map": round(m_float, 4),
                "itq_map": round(m_itq, 4),
                "lsh_pixels_map": round(m_lsh_px, 4),
                "vs_lsh_pixels": round(m / m_lsh_px, 3),
                "vs_float": round(m / m_float, 3),
                "target_2x_lsh_pixels_met": m >= 2 * m_lsh_px,
                "target_90pct_float_met": m >= 0.9 * m_float,
                "strict": {
                    "deepbit_map": round(sm, 4),
                    "float_map": round(s_float, 4),
                    "lsh_pixels_map": round(s_lsh_px, 4),
                    "vs_lsh_pixels": round(sm / s_lsh_px, 3),
                    "vs_float": round(sm / s_float, 3),
                },
            }


def write_results(args, bits, rows, targets, notes, t_all) -> None:
    result = {
        "benchmark": "retrieval mAP@100, Fashion-MNIST (10k test queries vs 60k train database)",
        "bits": bits,
        "rows": rows,
        "targets": targets,
        "notes": notes,
        "total_s": round(time.perf_counter() - t_all, 1),
        "cpus": os.cpu_count(),
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "retrieval.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    lines = [
        "# Retrieval mAP@100 on Fashion-MNIST",
        "",
        "| method | kind | mAP@100 | strict mAP@100 | time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['kind']} | {r['map@100']:.4f} | {r['strict_map@100']:.4f} | {r['seconds']} |"
        for r in rows
    ]
    for label, tg in targets.items():
        lines += [
            "",
            f"**{label}**: DeepBit-{bits} {tg['deepbit_map']:.4f} = {tg['vs_lsh_pixels']:.2f}x LSH-{bits} on pixels "
            f"(target 2x: {'met' if tg['target_2x_lsh_pixels_met'] else 'missed'}), {100 * tg['vs_float']:.1f}% of float "
            f"(target 90%: {'met' if tg['target_90pct_float_met'] else 'missed'}). Strict AP: "
            f"{tg['strict']['vs_lsh_pixels']:.2f}x LSH on pixels, {100 * tg['strict']['vs_float']:.1f}% of float.",
        ]
    lines += [""] + [f"- {n}" for n in notes]
    with open(os.path.join(args.results, "retrieval.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()
