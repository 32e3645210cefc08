"""The stream shard cache: same batches as the memory cache, flat memory, nothing left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
import torch
from conftest import make_image

from sparkvision.ssl.pretrain import pretrain
from sparkvision.train import AugmentConfig, TrainConfig, train
from sparkvision.train.data import epoch_indices, load_shard, pixel_stats, split_mask
from sparkvision.train.store import EncodedRows

FAST = dict(
    batch_size=16,
    lr=3e-3,
    model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.0},
    augment=AugmentConfig.none(),
)


def _rows(n: int = 90) -> list[tuple[bytes | None, int | None, str]]:
    """Real encoded images of mixed kinds (gray/RGB PNG, JPEG, other sizes) and some bad rows."""
    kinds = [("L", "PNG", 16), ("RGB", "PNG", 12), ("RGB", "JPEG", 20), ("L", "JPEG", 16)]
    rows: list[tuple[bytes | None, int | None, str]] = []
    for i in range(n):
        mode, fmt, size = kinds[i % 4]
        rows.append(
            (make_image(i % 4, size=size, mode=mode, fmt=fmt, seed=i), i % 4, "train" if i % 3 else "test")
        )
    rows[5] = (b"not an image", 1, "train")  # dropped by both caches
    rows[11] = (None, 2, "test")  # a null image: dropped by both
    rows[17] = (rows[17][0], None, "unlabeled")
    return rows


def _batches(rows, chunk: int = 7):
    table = pa.table(
        {"image": [r[0] for r in rows], "label": [r[1] for r in rows], "split": [r[2] for r in rows]},
        schema=pa.schema([("image", pa.binary()), ("label", pa.int32()), ("split", pa.string())]),
    )
    return iter(table.to_batches(max_chunksize=chunk))


def test_stream_gives_the_batches_of_memory(tmp_path):
    rows = _rows()
    mem, mem_splits = load_shard(_batches(rows), 3, (16, 16), "memory")
    # spill_bytes=0: the encoded rows go to a file at once (the path a large table takes)
    st, st_splits = load_shard(
        _batches(rows), 3, (16, 16), "stream", threads=2, spill_dir=str(tmp_path), spill_bytes=0
    )
    try:
        assert st.cache == "stream" and mem.cache == "memory" and st.store.rows.on_disk
        assert len(st) == len(mem) == 88 and st.bad_rows == mem.bad_rows == 2
        assert st_splits == mem_splits and torch.equal(st.labels, mem.labels) and int(st.labels[15]) == -1
        for got, want in zip(pixel_stats(st.images, 3), pixel_stats(mem.images, 3), strict=True):
            assert torch.equal(got, want)  # the sample is every row: the very same sums
        train_m, train_s = (
            s.subset(split_mask(sp, "train")) for s, sp in ((mem, mem_splits), (st, st_splits))
        )
        assert len(train_s) == len(train_m) and torch.equal(train_s.labels, train_m.labels)
        calls = {"now": 0}
        decode_now = st.store.decoder.decode_now

        def counted(ids):
            calls["now"] += 1
            return decode_now(ids)

        st.store.decoder.decode_now = counted
        for epoch in range(2):  # the plan each epoch, as the rank skeleton walks it
            idx = epoch_indices(len(train_s), 9, 8, seed=0, epoch=epoch, rank=0)
            train_s.plan(idx)
            for b in idx:
                assert torch.equal(train_s.images[b], train_m.images[b])
        assert calls["now"] == 0  # every planned batch came decoded from the prefetch queue
        idx = epoch_indices(len(train_s), 9, 8, seed=0, epoch=2, rank=0)
        train_s.plan(idx, 4)  # an epoch resumed at step 4
        for b in idx[4:]:
            assert torch.equal(train_s.images[b], train_m.images[b])
        train_s.plan(idx)
        for b in idx[6:]:  # a plan walked from elsewhere than said: it restarts at the batch asked for
            assert torch.equal(train_s.images[b], train_m.images[b])
        assert calls["now"] == 0
        for i in range(0, len(st), 32):  # evaluation's slices, read one ahead
            assert torch.equal(st.images[i : i + 32], mem.images[i : i + 32])
        random = torch.randint(len(st), (40,))  # FixMatch's draws: decoded on demand
        assert calls["now"] == 1  # the first slice; the others were read ahead
        assert torch.equal(st.images[random], mem.images[random]) and calls["now"] == 2
        assert torch.equal(st.head(5).images[:], mem.head(5).images) and st.images.shape == mem.images.shape
        assert torch.equal(st.images[3], mem.images[3])
    finally:
        st.store.close()
    assert os.listdir(tmp_path) == []


def test_truncated_body_is_zeros_in_stream_and_dropped_in_memory(tmp_path):
    rows = _rows(20)
    rows[4] = (rows[4][0][:60], 0, "train")  # a PNG whose header reads but whose body is cut
    mem, _ = load_shard(_batches(rows), 1, (16, 16), "memory")
    st, _ = load_shard(_batches(rows), 1, (16, 16), "stream", spill_dir=str(tmp_path))
    try:
        assert len(mem) == 17 and len(st) == 18 and not st.store.rows.on_disk  # small: kept in memory
        x = st.images[:]
        assert int(x[4].sum()) == 0 and st.images.failed == 1
        assert torch.equal(torch.cat([x[:4], x[5:]]), mem.images)  # every other row as memory has it
    finally:
        st.store.close()


def test_auto_picks_memory_when_it_fits_with_room_and_stream_otherwise(tmp_path):
    rows = _rows(20)
    need = 20 * 3 * 8 * 8  # every row counts: the choice is made before decoding
    roomy, _ = load_shard(_batches(rows), 3, (8, 8), "auto", available_bytes=2 * need)
    tight, _ = load_shard(
        _batches(rows), 3, (8, 8), "auto", available_bytes=2 * need - 1, spill_dir=str(tmp_path)
    )
    unknown, _ = load_shard(_batches(rows), 3, (8, 8), "auto", available_bytes=None)
    assert (roomy.cache, tight.cache, unknown.cache) == ("memory", "stream", "memory")
    tight.store.close()
    with pytest.raises(ValueError, match="needs .* GiB decoded.*more workers"):
        load_shard(_batches(rows), 3, (8, 8), "memory", available_bytes=need - 1)
    forced, _ = load_shard(_batches(rows), 3, (8, 8), "stream", available_bytes=1)  # never refused
    assert len(forced) == 18
    forced.store.close()


def test_spill_file_is_gone_from_the_local_dir_and_reads_back(tmp_path):
    data = [make_image(k, size=16, seed=k) for k in range(6)]
    rows = EncodedRows(str(tmp_path), spill_bytes=len(data[0]) + len(data[1]))  # spills at the third
    rows.append(pa.array(data[:2], pa.binary()))
    assert not rows.on_disk
    rows.append(pa.array([b"skipped"] + data[2:], pa.large_binary()).slice(1))  # an offset into buffers
    rows.finish()
    assert rows.on_disk and rows.path and rows.path.startswith(str(tmp_path))
    assert os.listdir(tmp_path) == []  # unlinked as soon as it was opened: nothing to leak
    assert [rows.read(i) for i in range(6)] == data
    rows.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"cannot create a file in .*missing .*spark.local.dir"):
        EncodedRows(str(tmp_path / "missing"), spill_bytes=0).append(pa.array(data[:1], pa.binary()))


CHILD = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from conftest import make_image
    from sparkvision.train.data import epoch_indices, load_shard, pixel_stats

    spill, size = sys.argv[1], 96
    pool = [make_image(k % 4, size=size, mode="RGB", fmt="JPEG", seed=k) for k in range(32)]

    def batches(n):  # made on the fly, as Spark sends them: the input costs no memory
        for start in range(0, n, 500):
            m = min(500, n - start)
            yield pa.RecordBatch.from_pydict(
                {"image": [pool[i % 32] for i in range(start, start + m)],
                 "label": [i % 4 for i in range(start, start + m)], "split": ["train"] * m}
            )

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def epoch(n, cache):  # what a rank does: load, statistics, an epoch of 100 planned batches
        shard, _ = load_shard(batches(n), 3, (size, size), cache, threads=2, spill_dir=spill, spill_bytes=0)
        pixel_stats(shard.images, 3, sample=256)
        idx = epoch_indices(len(shard), 100, 32, 0, 0, 0)  # the same work: smaller shards cycle
        shard.plan(idx)
        for b in idx:
            shard.images[b]
        if shard.store is not None:
            shard.store.close()
        return peak()

    epoch(300, "stream")  # warm up: lazy imports, thread stacks, the allocator's arenas
    print(json.dumps([epoch(300, "stream"), epoch(3000, "stream"), epoch(3000, "memory")]))
    """
)


def test_a_ranks_memory_stays_flat_as_the_table_grows(tmp_path):
    """Peak RSS after an epoch (the same 100 steps) of the stream cache on 300, then on 3,000 rows of
    96x96 RGB JPEGs (75 MB more decoded pixels): about the same; the memory cache on 3,000 rows then
    rises by the decoded size (the measurement can see such growth). glibc's dynamic mmap threshold
    is pinned in the child: otherwise where a freed batch lands (a mapping returned at once, or an
    arena that keeps it) varies run to run by tens of MB, whatever the table's size."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.getcwd()]),
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    }
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    small, large, memory = json.loads(out.stdout.strip().splitlines()[-1])
    decoded = 3 * 96 * 96
    assert large - small < 0.1 * 2700 * decoded, (small, large)
    assert memory - large > 0.8 * 3000 * decoded, (large, memory)
    assert [f for f in os.listdir(tmp_path) if f.startswith("sparkvision-shard")] == []


def test_train_streams_the_same_run_as_memory(spark, tiny_table, tmp_path):
    runs = {
        cache: train(
            spark, tiny_table, str(tmp_path / cache), TrainConfig(epochs=3, workers=2, cache=cache, **FAST)
        )
        for cache in ("memory", "stream")
    }
    assert runs["stream"]["cache"] == "stream" and runs["memory"]["cache"] == "memory"
    keys = ("epoch", "train_loss", "test_acc", "test_loss")
    assert [{k: h[k] for k in keys} for h in runs["stream"]["history"]] == [
        {k: h[k] for k in keys} for h in runs["memory"]["history"]
    ]
    metrics = json.loads((tmp_path / "stream" / "metrics.json").read_text())
    assert metrics["cache"] == "stream"


def test_pretrain_streams_with_its_monitor(spark, tiny_table, tmp_path):
    kw = dict(
        preset="cpu-small",
        batch_size=32,
        pool_split="train",
        monitor_split="test",
        warmup_epochs=0,
        model_kwargs={"widths": [8, 16], "hidden": 32, "dropout": 0.0},
        proj_dim=64,
        proj_hidden=64,
        epochs=2,
        workers=2,
    )
    runs = {
        c: pretrain(spark, tiny_table, str(tmp_path / c), method="simclr", cache=c, **kw)
        for c in ("memory", "stream")
    }
    keys = ("train_loss", "knn_acc", "output_std")
    assert runs["stream"]["cache"] == "stream"
    assert [{k: h[k] for k in keys} for h in runs["stream"]["history"]] == [
        {k: h[k] for k in keys} for h in runs["memory"]["history"]
    ]


def _dealt(df) -> list[list[bytes]]:
    """Each partition's images, in order."""
    from pyspark.sql import functions as F

    got = df.select(F.spark_partition_id().alias("p"), F.monotonically_increasing_id().alias("i"), "image")
    parts: dict[int, list[tuple[int, bytes]]] = {}
    for r in got.collect():
        parts.setdefault(r.p, []).append((r.i, bytes(r.image)))
    return [[b for _, b in sorted(parts.get(p, []))] for p in range(max(parts) + 1)]


def test_deal_fixes_each_ranks_rows_and_order_and_reshuffle_deals_afresh(spark):
    """``deal`` (docs/training.md, "How rows mix"): the same table and seed give every rank the
    same rows in the same order, however the input is ordered or split (so a resumed epoch sees
    the batches it was on); ``reshuffle`` deals a fresh, near-even split every epoch."""
    from sparkvision.train.driver import deal

    rows = [(f"img-{i}".encode() * 3, i % 3, "train") for i in range(400)]
    df = spark.createDataFrame(rows, "image binary, label int, split string")
    shuffled = spark.createDataFrame(list(reversed(rows)), df.schema).repartition(3)

    once = _dealt(deal(df, 2, seed=1))
    assert [len(p) for p in once] == [200, 200]  # round-robin: equal shares
    assert once == _dealt(deal(df, 2, seed=1))

    epoch0 = _dealt(deal(df, 2, seed=1, epoch=0))
    assert epoch0 == _dealt(deal(shuffled, 2, seed=1, epoch=0))  # by content, not by position
    assert all(150 < len(p) < 250 for p in epoch0), [len(p) for p in epoch0]
    epoch1 = _dealt(deal(df, 2, seed=1, epoch=1))
    moved = len(set(epoch0[0]) - set(epoch1[0])) / len(epoch0[0])
    assert 0.3 < moved < 0.7, moved  # about half of rank 0's rows go elsewhere the next epoch
    assert sorted(epoch0[0] + epoch0[1]) == sorted(r[0] for r in rows)  # every row, once
