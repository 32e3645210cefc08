"""`sparkvision train`, `sparkvision evaluate` and `sparkvision models`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from sparkvision.cli.common import Conf, JsonOut, Master, console, emit, guarded, render_kv, spark_from


def render_train(s: dict[str, Any]) -> None:
    t = Table(title="training")
    for col in ("epoch", "train loss", "test acc", "images/s", "epoch s"):
        t.add_column(col, justify="right")
    for h in s["history"]:
        acc = "-" if h["test_acc"] is None else f"{h['test_acc']:.4f}"
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", acc, f"{h['images_per_s']:.0f}", f"{h['epoch_time_s']:.1f}")
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def train(
    table: Annotated[str, typer.Option("--table", help="Image table to train on (its train split).")],
    out: Annotated[str, typer.Option("--out", help="Model directory to write (checkpoints, logs, weights).")],
    model: Annotated[str, typer.Option(help="Registered model name (see `sparkvision models`).")] = "cnn",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Global batch size, split over the workers.")] = 128,
    workers: Annotated[int, typer.Option(help="DDP ranks (Spark barrier tasks).")] = 1,
    threads_per_rank: Annotated[int | None, typer.Option(help="Torch threads per rank (default cores per task).")] = None,
    optimizer: Annotated[str, typer.Option(help="sgd | adamw")] = "adamw",
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    schedule: Annotated[str, typer.Option(help="onecycle | cosine | constant")] = "onecycle",
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up (cosine/constant).")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on biases/norms).")] = 5e-4,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.05,
    augment: Annotated[str | None, typer.Option(
        help="Augmentations, e.g. 'hflip=0.5,crop_padding=2,rotation=10,scale=0.9:1.1,brightness=0.2,"
             "contrast=0.2,saturation=0.2,hue=0.05,grayscale=0.1', or 'none'. Default hflip=0.5,crop_padding=2.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    eval_split: Annotated[str, typer.Option(help="Split for per-epoch accuracy ('none' to skip).")] = "test",
    image_size: Annotated[int | None, typer.Option(help="Resize to SIZE x SIZE (default: the table's size).")] = None,
    channels: Annotated[int | None, typer.Option(help="1 or 3 input channels (default: from the table).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    model_kwargs: Annotated[str | None, typer.Option(help="JSON of extra model arguments.")] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Train a classifier data-parallel (torch DDP on Spark barrier tasks)."""
    from sparkvision.train import TrainConfig, parse_augment
    from sparkvision.train import train as run_train

    def body() -> dict[str, Any]:
        cfg = TrainConfig(
            model=model, epochs=epochs, batch_size=batch_size, workers=workers, threads_per_rank=threads_per_rank,
            optimizer=optimizer, lr=lr, schedule=schedule, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
            momentum=momentum, label_smoothing=label_smoothing, augment=parse_augment(augment), seed=seed,
            eval_split=None if eval_split == "none" else eval_split,
            image_size=(image_size, image_size) if image_size else None, channels=channels, resume=resume,
            model_kwargs=json.loads(model_kwargs) if model_kwargs else {},
        )
        from sparkvision.models import list_models

        if model not in list_models():
            raise ValueError(f"--model {model!r} is not registered; choose from {', '.join(list_models())}")
        return run_train(spark_from(master, conf), table, out, cfg)

    emit(guarded(body, json_out), json_out, render_train)


def evaluate(
    model_dir: Annotated[str, typer.Argument(help="Model directory from `sparkvision train`.")],
    table: Annotated[str, typer.Argument(help="Image table.")],
    split: Annotated[str, typer.Option(help="Split to evaluate ('all' for every labelled row).")] = "test",
    out: Annotated[str | None, typer.Option(help="Where to write evaluation.json and the PNG (default MODEL).")] = None,
    batch_size: Annotated[int, typer.Option(help="Inference batch size.")] = 512,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix (JSON and PNG)."""
    from sparkvision.inference.evaluate import evaluate as run_eval

    def render(s: dict[str, Any]) -> None:
        t = Table(title=f"accuracy {s['accuracy']:.4f}  macro F1 {s['macro_f1']:.4f}  ({s['rows']:,} rows)")
        for col in ("class", "precision", "recall", "F1", "support"):
            t.add_column(col, justify="right")
        for name, m in s["per_class"].items():
            t.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
        console.print(t)
        render_kv({"evaluation": s["evaluation_json"], "confusion matrix": s["confusion_matrix_png"],
                   "undecodable rows": s["undecodable_rows"], "elapsed": f"{s['elapsed_s']:.1f} s"})

    def body() -> dict[str, Any]:
        return run_eval(spark_from(master, conf), model_dir, table, None if split == "all" else split, out, batch_size)

    emit(guarded(body, json_out), json_out, render)


def models(json_out: JsonOut = False) -> None:
    """List the registered models."""
    from sparkvision.models import list_models

    emit({"models": list_models()}, json_out)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("models")(models)
