"""Training benchmarks on Fashion-MNIST (issue 3).

1. accuracy: `cnn` trained with sparkvision for up to 20 epochs on CPU; test accuracy per epoch
   and total time. Target: >= 93.0% within 20 epochs.
2. throughput: sparkvision's training images/s divided by a plain single-process PyTorch loop over
   in-memory tensors with the same model, global batch, augmentations and total cores, measured
   in the same run (alternating, so machine noise hits both). Target: >= 0.95.

    .venv/bin/python benchmarks/bench_train.py [--table data/fashion-mnist] [--epochs 20]
        [--skip-accuracy] [--throughput-epochs 1]

Results: benchmarks/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sparkvision.models import create_model  # noqa: E402
from sparkvision.spark.session import get_spark  # noqa: E402
from sparkvision.train import BatchAugment, TrainConfig, train  # noqa: E402
from sparkvision.train.data import epoch_indices, steps_per_epoch  # noqa: E402
from sparkvision.train.optim import build_optimizer, lr_factor, param_groups, set_lr  # noqa: E402
from sparkvision.transforms.preprocess import decode_image  # noqa: E402


def load_plain(table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain baseline's in-memory tensors (read with pyarrow, outside the timed region)."""
    import pyarrow.parquet as pq

    t = pq.read_table(table.replace("file://", ""), columns=["image", "label", "split"])
    d = t.to_pydict()
    imgs = [
        decode_image(b, 1, (28, 28)).transpose(1, 2, 0)
        for b, s in zip(d["image"], d["split"], strict=True)
        if s == "train"
    ]
    labels = [lab for lab, s in zip(d["label"], d["split"], strict=True) if s == "train"]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def plain_epoch(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, threads: int) -> float:
    """One epoch of the textbook loop: same model, batch, augmentation, optimizer; returns images/s."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(cfg.model, 10, 1).to(memory_format=torch.channels_last)
    opt = build_optimizer(param_groups(model, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.weight_decay)
    aug = BatchAugment(cfg.augment)
    mean = x.float().div(255).mean().view(1, 1, 1, 1)
    std = x.float().div(255).std().view(1, 1, 1, 1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    steps = steps_per_epoch(len(x), cfg.batch_size)
    idx = epoch_indices(len(x), steps, cfg.batch_size, 0, 0, 0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        b = idx[s]
        xb = ((aug(x[b].float().div_(255), gen) - mean) / std).contiguous(memory_format=torch.channels_last)
        set_lr(opt, cfg.lr, lr_factor(s, steps, cfg.schedule))
        loss = loss_fn(model(xb), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="data/fashion-mnist")
    ap.add_argument("--out", default="runs/bench-cnn")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--throughput-rounds", type=int, default=2)
    ap.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"hidden\": 512}'")
    ap.add_argument("--label-smoothing", type=float, default=0.05)
    ap.add_argument("--results", default=os.path.join(HERE, "results", "train.json"))
    args = ap.parse_args()
    os.environ.setdefault("SPARKVISION_PROGRESS", "0")
    spark = get_spark("local[2]")
    if not os.path.exists(args.table):
        from sparkvision.data.datasets import ingest_fashion_mnist

        ingest_fashion_mnist(spark, args.table)
    cores = os.cpu_count() or 1
    results: dict = {
        "machine": {"cores": cores, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%d %H:%M"),
    }
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = {**json.load(f), **results}

    cfg = TrainConfig(
        epochs=args.epochs,
        workers=args.workers,
        label_smoothing=args.label_smoothing,
        model_kwargs=json.loads(args.model_kwargs),
    )
    if not args.skip_accuracy:
        t0 = time.perf_counter()
        summary = train(spark, args.table, args.out, cfg)
        results["accuracy"] = {
            "config": cfg.to_json(),
            "per_epoch": [
                {k: h[k] for k in ("epoch", "test_acc", "train_loss", "images_per_s", "epoch_time_s")}
                for h in summary["history"]
            ],
            "final_test_acc": summary["test_acc"],
            "best_test_acc": max(h["test_acc"] for h in summary["history"]),
            "total_time_s": round(time.perf_counter() - t0, 1),
            "target": 0.93,
            "met": summary["test_acc"] >= 0.93,
        }
        print(json.dumps(results["accuracy"], indent=1))
        _save(args.results, results)

    if args.throughput_rounds <= 0:
        return
    # Throughput: alternate plain / sparkvision rounds in one run; 1 epoch each.
    x, y = load_plain(args.table)
    tcfg = TrainConfig(epochs=1, workers=args.workers, label_smoothing=args.label_smoothing)
    rounds = []
    for _ in range(args.throughput_rounds):
        plain = plain_epoch(x, y, tcfg, threads=cores)
        t0 = time.perf_counter()
        sv = train(spark, args.table, os.path.join(args.out + "-throughput"), tcfg)
        wall = time.perf_counter() - t0
        sv1 = None
        if args.workers != 1:
            cfg1 = TrainConfig(epochs=1, workers=1, label_smoothing=args.label_smoothing)
            sv1 = train(spark, args.table, os.path.join(args.out + "-throughput"), cfg1)["images_per_s"]
        rounds.append(
            {
                "plain_images_per_s": round(plain, 1),
                "sparkvision_images_per_s": sv["images_per_s"],
                "sparkvision_1worker_images_per_s": sv1,
                "sparkvision_wall_s": round(wall, 1),
                "sparkvision_data_load_s": sv["data_load_s"],
                "ratio": round(sv["images_per_s"] / plain, 3),
                "ratio_1worker": round(sv1 / plain, 3) if sv1 else None,
                "ratio_end_to_end": round(len(x) / wall / plain, 3),
            }
        )
        print(rounds[-1])
    results["throughput"] = {
        "rounds": rounds,
        "workers": args.workers,
        "cores": cores,
        "ratio": round(float(np.median([r["ratio"] for r in rounds])), 3),
        "ratio_1worker": (
            round(float(np.median([r["ratio_1worker"] for r in rounds])), 3)
            if rounds and rounds[0]["ratio_1worker"]
            else None
        ),
        "ratio_end_to_end": round(float(np.median([r["ratio_end_to_end"] for r in rounds])), 3),
        "target": 0.95,
    }
    results["throughput"]["met"] = results["throughput"]["ratio"] >= 0.95
    print(json.dumps(results["throughput"], indent=1))
    _save(args.results, results)


def _save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    acc = results.get("accuracy", {})
    thr = results.get("throughput", {})
    lines = [
        "# Training benchmark (Fashion-MNIST, cnn, CPU)",
        "",
        f"Run {results['created']}, "
        f"{results['machine']['cores']} cores, torch {results['machine']['torch']}.",
        "",
    ]
    if acc:
        lines += [
            f"- Test accuracy after {len(acc['per_epoch'])} epochs: **{acc['final_test_acc']:.2%}** "
            f"(best {acc['best_test_acc']:.2%}; target 93.0%: {'met' if acc['met'] else 'MISSED'}), "
            f"total {acc['total_time_s']:.0f} s.",
            "",
            "| epoch | test acc | train loss | images/s |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {h['epoch']} | {h['test_acc']:.4f} | {h['train_loss']:.4f} | {h['images_per_s']:.0f} |"
            for h in acc["per_epoch"]
        ]
    if thr:
        lines += [
            "",
            f"- Throughput ratio sparkvision / plain PyTorch (per-epoch training images/s, "
            f"{thr['workers']} DDP ranks vs one process, {thr['cores']} cores in all): **{thr['ratio']}** "
            f"(target 0.95: {'met' if thr['met'] else 'MISSED'}); 1 rank: {thr['ratio_1worker']}; "
            f"end to end incl. Spark read + decode: {thr['ratio_end_to_end']}.",
            "",
        ]
        lines += [
            "| round | plain img/s | sparkvision img/s | 1-rank img/s | ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {i + 1} | {r['plain_images_per_s']} | {r['sparkvision_images_per_s']} | "
            f"{r['sparkvision_1worker_images_per_s']} | {r['ratio']} |"
            for i, r in enumerate(thr["rounds"])
        ]
    with open(path.replace(".json", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
