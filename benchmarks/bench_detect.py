"""Detect -> crop -> embed benchmark (issue 18): detection quality, what the crop buys in
retrieval, and the one-pass pipeline against two jobs over a materialised crops table.

Data (all made here from the Fashion-MNIST image table, ``sparkvision datasets fashion-mnist``):

* **Detection scenes**: ``datasets scenes`` over ``--train-items`` train-split items and
  ``--test-items`` test-split items (1-3 items per 128-pixel scene, cluttered backgrounds); a
  scene keeps its items' split, so the held-out scenes' items were never seen in training.
* **Query scenes**: one more scene set, one item each, from ``--query-items`` *other* test-split
  items: the product-photo case (one product, small, on a busy background).
* **Gallery**: every clean test-split item (10,000).

Steps, each timed: train ``fasterrcnn_tiny`` (2 ranks) and read mAP@0.5 / mAP@[.5:.95] on the
held-out scenes from its per-epoch evaluation (torchmetrics' COCO evaluation); train a ``cnn``
embedder on the train split; embed the gallery; then, on the query scenes, alternating rounds of
``features`` (one pass) and ``crop`` + ``embed`` (two jobs, crops written), and whole-scene
``embed``.

Three embedders are scored: ``cnn`` trained on the clean train items only; ``cnn_crops``, the
same recipe on the clean train items plus 5 copies of the crops of the training scenes
(``crop --all-boxes``; each crop labelled by the true box it matches), a classifier that has
seen clutter; and ``ssl_items``, an instance-level encoder pretrained self-supervised on the
train items with the ``cpu-items`` preset (views cut to the object's box and pasted on clutter,
as ``features`` will show an item; no labels, no scenes). The targets are read for each.

Retrieval is scored by mAP over the full ranking of the gallery (mAP@all), with two notions of
relevant: the same item (its content id) and the same class, for whole-scene features, crop
features, 64-bit learned codes of the crops (ITQ and DeepBit, each fitted on the gallery's
features, no labels), and
64-bit LSH on the crops' pixels (28x28 gray, as the gallery items). Ties in Hamming distance are
broken by one fixed random order of the gallery.

Targets: mAP@0.5 >= 0.90; crops beat whole scenes by >= 20 points of mAP@all; codes >= 2x LSH on
pixels and >= 90% of the crop's float features.

    .venv/bin/python benchmarks/bench_detect.py [--epochs 3] [--rounds 2] [--ssl-epochs N]
    .venv/bin/python benchmarks/bench_detect.py --rescore   # retrieval only, from the last run's work dir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow.dataset as pads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparkvision import api  # noqa: E402
from sparkvision.data.table import read_meta, read_table, write_meta  # noqa: E402
from sparkvision.retrieval.codes import fit_hasher, lsh  # noqa: E402
from sparkvision.retrieval.index import vectors_of  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.transforms.preprocess import decode_image  # noqa: E402


def read(path: str, columns: list[str], where=None):
    return pads.dataset(path.replace("file://", ""), format="parquet").to_table(columns=columns, filter=where)


def average_precision(order_rel: np.ndarray) -> np.ndarray:
    """``(Q, G)`` bool, relevance in ranked order -> AP over the full ranking per query."""
    rel = order_rel.astype(np.float64)
    prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
    hits = rel.sum(1)
    return np.where(hits > 0, (prec * rel).sum(1) / np.maximum(hits, 1), 0.0)


def map_all(order: np.ndarray, q_item, q_label, g_item, g_label) -> dict[str, float]:
    """mAP@all for same item and same class, given each query's ranking of the gallery, and how
    often the item itself is the first hit and among the first 10."""
    item_rel = g_item[order] == q_item[:, None]
    return {
        "same_item": round(float(average_precision(item_rel).mean()), 4),
        "same_class": round(float(average_precision(g_label[order] == q_label[:, None]).mean()), 4),
        "item_top1": round(float(item_rel[:, 0].mean()), 4),
        "item_top10": round(float(item_rel[:, :10].any(1).mean()), 4),
    }


def rank_float(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ g.T), axis=1, kind="stable")


def rank_hamming(q: np.ndarray, g: np.ndarray, shuffle: np.ndarray) -> np.ndarray:
    """Rank by Hamming distance, ties in the order ``shuffle`` of the gallery."""
    qb, gb = np.unpackbits(q, axis=1).astype(np.int16), np.unpackbits(g[shuffle], axis=1).astype(np.int16)
    dist = qb.sum(1)[:, None] + gb.sum(1)[None, :] - 2 * (qb @ gb.T)
    return shuffle[np.argsort(dist, axis=1, kind="stable")]


def gray28(images: list[bytes]) -> np.ndarray:
    return np.stack([decode_image(b, 1, (28, 28)).reshape(-1) for b in images]).astype(np.float32) / 255


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--work", default="benchmarks/out/detect")
    ap.add_argument("--train-items", type=int, default=3000)
    ap.add_argument("--test-items", type=int, default=1000)
    ap.add_argument("--query-items", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--ssl-epochs", type=int, default=None, help="epochs of the cpu-items pretraining (its preset's)"
    )
    ap.add_argument(
        "--items-encoder", default=None,
        help="a cpu-items encoder pretrained on the train split already (skips the pretraining)",
    )  # fmt: skip
    ap.add_argument(
        "--catalogue-min-score", type=float, default=None,
        help="features' --min-score for the clean catalogue (default: features' own)",
    )  # fmt: skip
    ap.add_argument(
        "--catalogue-only", action="store_true",
        help="only run the catalogue through features -> index -> search again, then score (from --work)",
    )  # fmt: skip
    ap.add_argument("--results", default=os.path.join(HERE, "results", "detect.json"))
    ap.add_argument(
        "--rescore", action="store_true",
        help="only score retrieval again from --work's tables and models of an earlier full run (no training)",
    )  # fmt: skip
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    spark = get_spark("local[2]")
    if args.rescore or args.catalogue_only:
        with open(args.results) as f:
            res = json.load(f)
        res["rescored"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if args.catalogue_only:
            catalogue(spark, args, w, res)
        return score_retrieval(spark, args, w, res)
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    res: dict = {"args": vars(args)}
    meta = read_meta(spark, args.table)
    src = read_table(spark, args.table)

    def subset(name: str, df) -> str:
        df.write.mode("overwrite").parquet(f"{w}/{name}")
        write_meta(spark, f"{w}/{name}", meta)
        return f"{w}/{name}"

    test = src.where("split = 'test'").orderBy("content_id")
    items = subset(
        "items",
        src.where("split = 'train'")
        .orderBy("content_id")
        .limit(args.train_items)
        .unionByName(test.limit(args.test_items)),
    )
    queries_src = subset("query_items", test.offset(args.test_items).limit(args.query_items))
    t = time.perf_counter()
    s = api.scenes(spark, source=items, out=f"{w}/scenes")
    q = api.scenes(spark, source=queries_src, out=f"{w}/query_scenes", max_items=1, seed=1)
    res["scenes"] = {
        "detection": s["rows_by_split"],
        "queries": q["scenes"],
        "elapsed_s": round(time.perf_counter() - t, 1),
    }
    print("scenes", res["scenes"], flush=True)

    # 1. The detector.
    t = time.perf_counter()
    det = api.train_detector(
        spark, table=f"{w}/scenes", out=f"{w}/detector", model="fasterrcnn_tiny", workers=2,
        epochs=args.epochs, batch_size=16, lr=3e-3,
    )  # fmt: skip
    wall = time.perf_counter() - t
    elapsed, reached = 0.0, None
    for h in det["history"]:
        elapsed += h["epoch_time_s"]
        if reached is None and (h["map_50"] or 0) >= 0.9:
            reached = {"epoch": h["epoch"], "train_s": round(elapsed, 1)}
    res["detector"] = {
        "model": "fasterrcnn_tiny", "workers": 2, "epochs": args.epochs, "train_scenes": det["train_rows"],
        "eval_scenes": det["eval_rows"], "map_50": det["map_50"], "map": det["map"], "wall_s": round(wall, 1),
        "reached_map50_0.9": reached, "history": det["history"],
    }  # fmt: skip
    print("detector", {k: v for k, v in res["detector"].items() if k != "history"}, flush=True)

    # 2. The embedder and the gallery.
    t = time.perf_counter()
    emb = api.train(spark, table=args.table, out=f"{w}/cnn", model="cnn", epochs=1, workers=2)
    res["embedder"] = {
        "model": "cnn",
        "epochs": 1,
        "test_acc": emb.get("test_acc"),
        "wall_s": round(time.perf_counter() - t, 1),
    }
    api.embed(spark, model_dir=f"{w}/cnn", table=args.table, out=f"{w}/gallery", split="test")

    # 3. Pipeline throughput: one pass against two jobs over a written crops table, alternating.
    rounds = []
    for r in range(args.rounds):
        t = time.perf_counter()
        f = api.features(
            spark,
            detector=f"{w}/detector",
            embedder=f"{w}/cnn",
            table=f"{w}/query_scenes",
            out=f"{w}/feats",
            overwrite=True,
        )
        one = time.perf_counter() - t
        t = time.perf_counter()
        c = api.crop(
            spark, detector=f"{w}/detector", table=f"{w}/query_scenes", out=f"{w}/crops", overwrite=True
        )
        api.embed(spark, model_dir=f"{w}/cnn", table=f"{w}/crops", out=f"{w}/crop_embed", overwrite=True)
        two = time.perf_counter() - t
        n = f["rows"]
        rounds.append({"round": r + 1, "features_img_s": round(n / one, 1), "two_jobs_img_s": round(n / two, 1),
                       "ratio": round(two / one, 3), "fallbacks": f["fallbacks"], "crops_fallbacks": c["fallbacks"]})  # fmt: skip
        print("throughput", rounds[-1], flush=True)
    res["throughput"] = {
        "scenes": n,
        "rounds": rounds,
        "median_ratio": float(np.median([r["ratio"] for r in rounds])),
    }

    # 4. An embedder that has seen clutter: the same cnn trained on the clean train items plus the
    #    crops of the training scenes (each labelled by the true box it matches), 5 copies of them.
    t = time.perf_counter()
    api.crop(
        spark,
        detector=f"{w}/detector",
        table=f"{w}/scenes",
        out=f"{w}/train_crops",
        split="train",
        all_boxes=True,
    )
    crops_df = read_table(spark, f"{w}/train_crops")
    mixed = src
    for _ in range(5):
        mixed = mixed.unionByName(crops_df)
    subset("mixed", mixed)
    emb2 = api.train(
        spark,
        table=f"{w}/mixed",
        out=f"{w}/cnn_crops",
        model="cnn",
        epochs=1,
        workers=2,
        channels=1,
        image_size=28,
    )
    res["embedder_crops"] = {
        "model": "cnn", "epochs": 1, "train_rows": emb2.get("train_rows"), "crops": crops_df.count(),
        "test_acc": emb2.get("test_acc"), "wall_s": round(time.perf_counter() - t, 1),
    }  # fmt: skip
    print("embedder on crops", res["embedder_crops"], flush=True)

    os.rename(f"{w}/gallery", f"{w}/gallery_cnn")
    gallery_and_queries(spark, args, w, "cnn_crops", "feats_crops")
    # 5. An instance-level encoder: self-supervised on the train items (labels ignored), its views
    #    showing each item as `features` will (the cpu-items preset).
    t = time.perf_counter()
    if args.items_encoder:
        shutil.copytree(args.items_encoder, f"{w}/ssl_items")
        res["embedder_items"] = {"model": "cnn", "preset": "cpu-items", "given": args.items_encoder}
    else:
        ssl = api.pretrain(
            spark, table=args.table, out=f"{w}/ssl_items", preset="cpu-items", pool_split="train",
            epochs=args.ssl_epochs, monitor_split="test",
        )  # fmt: skip
        res["embedder_items"] = {
            "model": "cnn", "preset": "cpu-items", "epochs": args.ssl_epochs, "knn_acc": ssl.get("knn_acc"),
            "wall_s": round(time.perf_counter() - t, 1),
        }  # fmt: skip
    print("embedder for items", res["embedder_items"], flush=True)
    gallery_and_queries(spark, args, w, "ssl_items", "feats_ssl_items")

    catalogue(spark, args, w, res)
    with open(args.results, "w") as f:  # what --rescore starts from, should the scoring fail
        json.dump(res, f, indent=2)
    score_retrieval(spark, args, w, res)


def gallery_and_queries(spark, args, w: str, model: str, feats: str) -> None:
    """The clean test items embedded whole by ``model``, and the query scenes through `features`."""
    api.embed(spark, model_dir=f"{w}/{model}", table=args.table, out=f"{w}/gallery_{model}", split="test")
    api.features(
        spark,
        detector=f"{w}/detector",
        embedder=f"{w}/{model}",
        table=f"{w}/query_scenes",
        out=f"{w}/{feats}",
    )


def catalogue(spark, args, w: str, res: dict) -> None:
    # 6. The catalogue through the same pipeline, as a user runs it: `features` over the clean
    #    test items (the detector's box and margin, so gallery and queries are framed alike),
    #    `index` (which records the detector), and batch `search` of the query scenes (cropped
    #    the same way, because the index says so).
    t = time.perf_counter()
    gf = api.features(
        spark,
        detector=f"{w}/detector",
        embedder=f"{w}/ssl_items",
        table=args.table,
        split="test",
        out=f"{w}/gallery_crops_ssl_items",
        overwrite=True,
        **({"min_score": args.catalogue_min_score} if args.catalogue_min_score is not None else {}),
    )
    api.index(
        spark,
        features=f"{w}/gallery_crops_ssl_items",
        out=f"{w}/index_ssl_items",
        kind="flat",
        overwrite=True,
    )
    t_search = time.perf_counter()
    api.search(
        spark, index=f"{w}/index_ssl_items", table=f"{w}/query_scenes", out=f"{w}/hits_ssl_items", k=10,
        overwrite=True,
    )  # fmt: skip
    res["catalogue_features"] = {
        "rows": gf["rows"],
        "min_score": args.catalogue_min_score,
        "fallbacks": gf["fallbacks"],
        "features_img_s": round(gf["rows"] / (t_search - t), 1),
        "search_s": round(time.perf_counter() - t_search, 1),
    }
    print("catalogue through features", res["catalogue_features"], flush=True)


def score_retrieval(spark, args, w: str, res: dict) -> None:
    """5. Retrieval: query scenes against the clean gallery, for each embedder."""
    gal = read(f"{w}/gallery_cnn", ["content_id", "label"]).sort_by("content_id")
    g_label, g_item = gal.column("label").to_numpy(), np.array(gal.column("content_id").to_pylist())
    boxes = read(f"{w}/query_scenes", ["content_id", "boxes"]).to_pylist()
    item_of = {r["content_id"]: r["boxes"][0]["item_content_id"] for r in boxes}
    label_of = {r["content_id"]: r["boxes"][0]["label"] for r in boxes}
    gal_px = read(args.table, ["content_id", "image"], pads.field("split") == "test").to_pylist()
    px_of = {r["content_id"]: r["image"] for r in gal_px}
    crop_of = {
        r["source_content_id"]: r["image"]
        for r in read(f"{w}/crops", ["source_content_id", "image"]).to_pylist()
    }
    shuffle = np.random.default_rng(0).permutation(len(g_item))

    def queries(path: str):
        t = read(path, ["content_id", "embedding"]).sort_by("content_id")
        ids = t.column("content_id").to_pylist()
        return vectors_of(t, "embedding"), ids

    def score(model: str, feats: str) -> dict[str, dict[str, float]]:
        gal = read(f"{w}/gallery_{model}", ["content_id", "embedding"]).sort_by("content_id")
        assert gal.column("content_id").to_pylist() == list(g_item)
        g = vectors_of(gal, "embedding")
        api.embed(
            spark,
            model_dir=f"{w}/{model}",
            table=f"{w}/query_scenes",
            out=f"{w}/whole_{model}",
            overwrite=True,
        )
        whole, ids = queries(f"{w}/whole_{model}")
        crop, cids = queries(feats)
        assert ids == cids
        q_item, q_label = np.array([item_of[i] for i in ids]), np.array([label_of[i] for i in ids])

        def scored(order: np.ndarray) -> dict[str, float]:
            return map_all(order, q_item, q_label, g_item, g_label)

        out = {
            "whole scene, float": scored(rank_float(whole, g)),
            "crop, float": scored(rank_float(crop, g)),
        }
        for method, name in (("itq", "ITQ"), ("deepbit", "DeepBit")):  # learned on the gallery, no labels
            hasher = fit_hasher(method, g, 64, seed=0)
            out[f"crop, {name}-64 codes"] = scored(
                rank_hamming(hasher.encode(crop), hasher.encode(g), shuffle)
            )
        q_px = gray28([crop_of[i] for i in ids])
        g_px = gray28([px_of[i] for i in g_item])
        pixel_lsh = lsh(g_px.shape[1], 64, mean=g_px.mean(0), seed=0)
        out["crop, LSH-64 on pixels"] = scored(
            rank_hamming(pixel_lsh.encode(q_px), pixel_lsh.encode(g_px), shuffle)
        )
        if os.path.exists(f"{w}/gallery_crops_{model}"):  # the catalogue cropped as the queries are
            gc = read(f"{w}/gallery_crops_{model}", ["content_id", "embedding"]).sort_by("content_id")
            assert gc.column("content_id").to_pylist() == list(g_item)
            gcv = vectors_of(gc, "embedding")
            out["crop, float; catalogue cropped too"] = scored(rank_float(crop, gcv))
            hasher = fit_hasher("itq", gcv, 64, seed=0)
            out["crop, ITQ-64 codes; catalogue cropped too"] = scored(
                rank_hamming(hasher.encode(crop), hasher.encode(gcv), shuffle)
            )
        if os.path.exists(f"{w}/hits_{model}"):  # what `search --table` itself returned (top 10)
            hits = read(f"{w}/hits_{model}", ["query_content_id", "rank", "content_id"]).to_pylist()
            first = {h["query_content_id"]: h["content_id"] for h in hits if h["rank"] == 1}
            top10: dict[str, set] = {}
            for h in hits:
                top10.setdefault(h["query_content_id"], set()).add(h["content_id"])
            res.setdefault("search_hits", {})[model] = {
                "queries": len(top10),
                "item_top1": round(sum(first.get(q) == item_of[q] for q in item_of) / len(item_of), 4),
                "item_top10": round(sum(item_of[q] in top10.get(q, ()) for q in item_of) / len(item_of), 4),
            }
            print(model, "search --table", res["search_hits"][model], flush=True)
        for k, v in out.items():
            print(model, k, v, flush=True)
        return out

    feats = {"cnn": "feats", "cnn_crops": "feats_crops", "ssl_items": "feats_ssl_items"}
    by_model = {m: score(m, f"{w}/{f}") for m, f in feats.items() if os.path.exists(f"{w}/gallery_{m}")}
    res["retrieval"] = {"queries": len(item_of), "gallery": len(g_item), "map_all": by_model}
    mr = res["throughput"]["median_ratio"]
    res["targets"] = {
        "map50>=0.90": {"value": res["detector"]["map_50"], "met": res["detector"]["map_50"] >= 0.9}
    }
    for model in ("cnn_crops", "ssl_items"):  # the embedders a user would train for this job
        if model not in by_model:
            continue
        rows = by_model[model]
        wf, px = rows["whole scene, float"], rows["crop, LSH-64 on pixels"]
        for tail in ("", "; catalogue cropped too"):
            if f"crop, float{tail}" not in rows:
                continue
            cf = rows[f"crop, float{tail}"]
            for rel in ("same_item", "same_class"):
                res["targets"][f"{model}: crop-whole>=0.20 ({rel}){tail}"] = {
                    "value": round(cf[rel] - wf[rel], 4),
                    "met": cf[rel] - wf[rel] >= 0.2,
                }
            for name in ("ITQ", "DeepBit"):
                codes = rows.get(f"crop, {name}-64 codes{tail}")
                if codes is None:
                    continue
                for rel in ("same_item", "same_class"):
                    if not tail:  # LSH on pixels is against the clean catalogue's pixels
                        res["targets"][f"{model}: {name}-64 >= 2x LSH ({rel})"] = {
                            "value": round(codes[rel] / max(px[rel], 1e-9), 3),
                            "met": codes[rel] >= 2 * px[rel],
                        }
                    res["targets"][f"{model}: {name}-64 >= 0.9 crop float ({rel}){tail}"] = {
                        "value": round(codes[rel] / max(cf[rel], 1e-9), 3),
                        "met": codes[rel] >= 0.9 * cf[rel],
                    }
    res["targets"]["features one pass vs two jobs"] = {"value": round(mr, 3), "met": mr >= 1.0}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(res, f, indent=2)
    with open(args.results.removesuffix(".json") + ".md", "w") as f:
        f.write("| measure | value | target met |\n|---|---:|---|\n")
        for k, v in res["targets"].items():
            f.write(f"| {k} | {v['value']} | {'yes' if v['met'] else 'NO'} |\n")
        f.write(
            "\n| embedder | features | mAP@all same item | mAP@all same class | item first | item in top 10 |"
            "\n|---|---|---:|---:|---:|---:|\n"
        )
        for model, rows in by_model.items():
            for k, v in rows.items():
                f.write(
                    f"| {model} | {k} | {v['same_item']:.4f} | {v['same_class']:.4f} "
                    f"| {v['item_top1']:.3f} | {v['item_top10']:.3f} |\n"
                )
    print(json.dumps(res["targets"], indent=2))


if __name__ == "__main__":
    main()
