"""`sparkvision pretrain` and `sparkvision finetune`: self-supervised pretraining and few-label
fine-tuning / linear evaluation (thin wrappers over :mod:`sparkvision.ssl`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from sparkvision.cli.common import Conf, JsonOut, Master, console, emit, guarded, render_kv, spark_from

# Options shared by pretrain, finetune and distill.
Workers = Annotated[int, typer.Option(help="DDP ranks (Spark barrier tasks).")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")]
EvalSplit = Annotated[str, typer.Option(help="Split scored each few epochs ('none' to skip).")]
Augment = Annotated[str | None, typer.Option(help="Augmentations as for `train --augment`.")]
WeightDecay = Annotated[float, typer.Option(help="Weight decay.")]


def _render_pretrain(s: dict[str, Any]) -> None:
    t = Table(title=f"pretraining ({s['method']})")
    for col in ("epoch", "loss", "kNN acc", "std x sqrt(d)", "images/s", "epoch s"):
        t.add_column(col, justify="right")
    for h in s["history"]:
        knn = "-" if h["knn_acc"] is None else f"{h['knn_acc']:.4f}"
        std = f"{h['output_std_x_sqrt_d']:.3f}" + (" [red]collapse?[/red]" if h.get("collapse_warning") else "")
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", knn, std, f"{h['images_per_s']:.0f}",
                  f"{h['epoch_time_s']:.1f}")
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def _render_finetune(s: dict[str, Any]) -> None:
    if s["mode"] == "distill":
        title = f"distill from {s['teacher']} ({s['train_rows']:,} rows, teacher's soft labels)"
    else:
        title = f"{s['mode']} ({100 * s['label_fraction']:g}% of the labels, {s['train_rows']:,} rows)"
        if s.get("fixmatch"):
            title += " + FixMatch on the unlabelled pool"
    t = Table(title=title)
    cols = ["epoch", "train loss", "test acc", "epoch s"] + (["pseudo-labelled"] if s.get("fixmatch") else [])
    for col in cols:
        t.add_column(col, justify="right")
    for h in s["history"]:
        acc = "-" if h["test_acc"] is None else f"{h['test_acc']:.4f}"
        extra = [f"{100 * h['pseudo_label_rate']:.1f}%"] if "pseudo_label_rate" in h else []
        t.add_row(str(h["epoch"]), f"{h['train_loss']:.4f}", acc, f"{h['epoch_time_s']:.1f}", *extra)
    console.print(t)
    render_kv({k: v for k, v in s.items() if k != "history"})


def pretrain(
    table: Annotated[str, typer.Option("--table", help="Image table; pretrains on its --pool split.")],
    out: Annotated[str, typer.Option("--out", help="Encoder model directory to write (checkpoints, logs, weights).")],
    method: Annotated[str, typer.Option(help="improved-simclr | simsiam | simclr")] = "improved-simclr",
    preset: Annotated[str, typer.Option(help="paper | cpu-small | cpu-long (see docs/ssl.md)")] = "cpu-small",
    pool: Annotated[str, typer.Option(help="Split of images to pretrain on (labels ignored), e.g. unlabeled or train.")] = "unlabeled",
    monitor_split: Annotated[str, typer.Option(help="Labelled split for the kNN monitor ('none' to skip).")] = "val",
    monitor_bank_split: Annotated[str, typer.Option(help="Labelled split the kNN monitor votes with.")] = "train",
    model: Annotated[str | None, typer.Option(help="Encoder backbone (default: the preset's).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the preset's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.")] = None,
    base_lr: Annotated[float | None, typer.Option(help="Base learning rate.")] = None,
    proj_dim: Annotated[int | None, typer.Option(help="Projector / predictor output dimension.")] = None,
    temperature: Annotated[float | None, typer.Option(help="NT-Xent temperature (simclr).")] = None,
    workers: Workers = 1,
    threads_per_rank: Annotated[int | None, typer.Option(help="Torch threads per rank.")] = None,
    seed: Seed = 0,
    resume: Resume = False,
    model_kwargs: Annotated[str | None, typer.Option(help="JSON of extra encoder arguments.")] = None,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Self-supervised pretraining of an encoder on unlabelled images (DDP on Spark barrier tasks)."""
    from sparkvision.ssl.pretrain import pretrain as run

    def body() -> dict[str, Any]:
        return run(spark_from(master, conf), table, out, method=method, preset=preset, pool_split=pool,
                   monitor_split=None if monitor_split == "none" else monitor_split,
                   monitor_bank_split=monitor_bank_split, model=model, epochs=epochs, batch_size=batch_size,
                   base_lr=base_lr, proj_dim=proj_dim, temperature=temperature, workers=workers,
                   threads_per_rank=threads_per_rank, seed=seed, resume=resume,
                   model_kwargs=json.loads(model_kwargs) if model_kwargs else None)

    emit(guarded(body, json_out), json_out, _render_pretrain)


def finetune(
    table: Annotated[str, typer.Option("--table", help="Labelled image table.")],
    out: Annotated[str, typer.Option("--out", help="Classifier model directory to write.")],
    encoder: Annotated[str | None, typer.Option(help="Encoder model directory from `sparkvision pretrain` "
                                                     "(omit to train --model from scratch).")] = None,
    label_fraction: Annotated[float, typer.Option(help="Stratified share of labelled training rows, e.g. 0.05.")] = 1.0,
    linear: Annotated[bool, typer.Option("--linear", help="Linear evaluation: freeze the encoder, train the head.")] = False,
    sample_seed: Annotated[int, typer.Option(help="Seed of the label sample.")] = 0,
    model: Annotated[str, typer.Option(help="Backbone when training from scratch.")] = "cnn",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 40,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the head.")] = 2e-3,
    encoder_lr_scale: Annotated[float, typer.Option(help="Encoder LR = lr x this when fine-tuning.")] = 0.1,
    projector_layers: Annotated[int, typer.Option(help="Keep this many pretraining projector layers under the "
                                                       "head (SimCLRv2's fine-tuning from the projector).")] = 0,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd")] = "adamw",
    schedule: Annotated[str, typer.Option(help="onecycle | cosine | constant")] = "onecycle",
    weight_decay: WeightDecay = 5e-4,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.1,
    augment: Augment = None,
    train_split: Annotated[str, typer.Option(help="Split to sample labelled rows from.")] = "train",
    eval_split: EvalSplit = "test",
    consistency_weight: Annotated[float, typer.Option(help="FixMatch: weight of the loss on the unlabelled pool "
                                                           "(0 = off; 1 as in the paper).")] = 0.0,
    unlabeled_split: Annotated[str, typer.Option(help="FixMatch: split of unlabelled images (labels never read).")] = "unlabeled",
    confidence: Annotated[float, typer.Option(help="FixMatch: pseudo-label confidence threshold.")] = 0.95,
    unlabeled_ratio: Annotated[int, typer.Option(help="FixMatch: unlabelled images per labelled one in a step.")] = 7,
    strong_augment: Annotated[str | None, typer.Option(help="FixMatch: strong view, as --augment (default: shift 4, "
                                                            "jitter 0.3, cutout 0.5).")] = None,
    workers: Workers = 1,
    seed: Seed = 0,
    resume: Resume = False,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Fine-tune or linearly evaluate a pretrained encoder on a stratified label fraction
    (optionally semi-supervised: FixMatch on an unlabelled split)."""
    from sparkvision.ssl.config import FinetuneConfig, strong_augment_default
    from sparkvision.ssl.finetune import finetune as run
    from sparkvision.train import parse_augment

    def body() -> dict[str, Any]:
        strong = strong_augment_default() if strong_augment is None else parse_augment(strong_augment)
        cfg = FinetuneConfig(label_fraction=label_fraction, sample_seed=sample_seed, linear=linear, model=model,
                             epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                             encoder_lr_scale=encoder_lr_scale, projector_layers=projector_layers,
                             weight_decay=weight_decay, schedule=schedule,
                             label_smoothing=label_smoothing, augment=parse_augment(augment), seed=seed,
                             workers=workers, train_split=train_split,
                             eval_split=None if eval_split == "none" else eval_split, resume=resume,
                             consistency_weight=consistency_weight, unlabeled_split=unlabeled_split,
                             confidence=confidence, unlabeled_ratio=unlabeled_ratio, strong_augment=strong)
        return run(spark_from(master, conf), table, out, encoder, cfg)

    emit(guarded(body, json_out), json_out, _render_finetune)


def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="Classifier model directory whose soft labels train the student "
                                                     "(e.g. the output of `sparkvision finetune`).")],
    table: Annotated[str, typer.Option("--table", help="Image table holding the unlabelled pool.")],
    out: Annotated[str, typer.Option("--out", help="Student classifier model directory to write.")],
    encoder: Annotated[str | None, typer.Option(help="Initialise the student from this encoder model directory "
                                                     "(omit to start --model from random weights).")] = None,
    unlabeled_split: Annotated[str, typer.Option(help="Split the teacher labels (its own labels are never read).")] = "unlabeled",
    label_fraction: Annotated[float, typer.Option(help="Share of --train-split rows added to the pool "
                                                       "(when it is not the --unlabeled-split).")] = 1.0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of teacher and student.")] = 1.0,
    model: Annotated[str, typer.Option(help="Student backbone without --encoder.")] = "cnn",
    epochs: Annotated[int, typer.Option(help="Epochs over the pool.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the head.")] = 2e-3,
    encoder_lr_scale: Annotated[float, typer.Option(help="Encoder LR = lr x this (with --encoder).")] = 1.0,
    weight_decay: WeightDecay = 5e-4,
    augment: Augment = None,
    train_split: Annotated[str, typer.Option(help="Labelled split (sampled by --label-fraction).")] = "train",
    eval_split: EvalSplit = "test",
    workers: Workers = 1,
    seed: Seed = 0,
    resume: Resume = False,
    master: Master = None,
    conf: Conf = None,
    json_out: JsonOut = False,
) -> None:
    """Distil a fine-tuned teacher into a student on unlabelled images (SimCLRv2's third step)."""
    from sparkvision.ssl.config import FinetuneConfig
    from sparkvision.ssl.finetune import finetune as run
    from sparkvision.train import parse_augment

    def body() -> dict[str, Any]:
        cfg = FinetuneConfig(label_fraction=label_fraction, model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                             encoder_lr_scale=encoder_lr_scale, weight_decay=weight_decay, label_smoothing=0.0,
                             augment=parse_augment(augment), seed=seed, workers=workers, train_split=train_split,
                             eval_split=None if eval_split == "none" else eval_split, unlabeled_split=unlabeled_split,
                             distill_temperature=temperature, resume=resume)
        return run(spark_from(master, conf), table, out, encoder, cfg, eval_every=1, teacher=teacher)

    emit(guarded(body, json_out), json_out, _render_finetune)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
    app.command("finetune")(finetune)
    app.command("distill")(distill)
