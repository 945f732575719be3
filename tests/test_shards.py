"""Tar shards: make_shards.py writes them (local folders and GCS), shards.py reads them (whole
shards, one request each), the shard-aware epoch order, and training from shards. GCS tests run
against the gcp-storage-emulator behind the counting, fault-injecting proxy of tests/gcs_server.py,
with the real google-cloud-storage client."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gcs_server, conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package

import augment  # noqa: E402
import data  # noqa: E402
import make_shards  # noqa: E402
import shards  # noqa: E402
import sources  # noqa: E402
from config import ConfigError, DataConfig, parse_data_config
from conftest import data_dirs, photo_like, talking_to, train_images  # noqa: E402
from gcs_server import FakeGCS  # noqa: E402

BUCKET = "byol-shards"
CLASSES = ["bird", "cat", "dog"]
CORRUPT = "cat/corrupt.png"
# About 1.3 kB per member (a 16x16 noise PNG plus its 512-byte header): 4 or 5 per shard.
SHARD_MB = "0.005"


def write_tree(root):
    """root/<class>/*.png: 12 decodable 16-px PNGs per class, plus one corrupt file."""
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        os.makedirs(root / cls)
        for i in range(12):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root


def originals(root):
    """{relative name: bytes} of every file under root."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def shard_index(folder):
    return json.loads((folder / "index.json").read_text())


def write_shards(source, dest, *extra):
    return make_shards.main([str(source), str(dest), "--shard-size-mb", SHARD_MB, *map(str, extra)])


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "images")


def data_config(**overrides) -> DataConfig:
    raw = {"num_workers": 0, "gcs_concurrency": 4}
    raw.update(overrides)
    return parse_data_config(raw)


# ---------------------------------------------------------------------------------------------
# Writing local shards
# ---------------------------------------------------------------------------------------------


def test_local_shards_hold_every_image_once_as_tar_reads_them(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert write_shards(tree, out) == 0, capsys.readouterr().err
    index = shard_index(out)
    files = originals(tree)
    assert index["classes"] == CLASSES and len(index["shards"]) >= 6
    members = [m for s in index["shards"] for m in s["members"]]
    assert sorted(m[0] for m in members) == sorted(files)  # each image once, the corrupt too
    for shard in index["shards"]:
        path = out / shard["name"]
        assert shard["size"] == path.stat().st_size
        # The system's tar lists the members in the indexed order and extracts the original bytes.
        listed = subprocess.run(
            ["tar", "-tf", str(path)], capture_output=True, text=True, check=True
        )
        assert listed.stdout.split() == [m[0] for m in shard["members"]]
        blob = path.read_bytes()
        for name, offset, length, label in shard["members"]:
            assert blob[offset : offset + length] == files[name]
            assert CLASSES[label] == name.split("/")[0]
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", str(out / "shard-00000.tar"), "-C", str(extracted)], check=True)
    for name, *_ in index["shards"][0]["members"]:
        assert (extracted / name).read_bytes() == files[name]
    # The images are in a seeded random order: the first shard is not one class's files.
    assert len({m[0].split("/")[0] for m in members[:9]}) > 1
    assert sorted(
        p.name for p in out.iterdir() if not re.fullmatch(r"shard-\d{5}\.(tar|json)", p.name)
    ) == ["index.json"]
    err = capsys.readouterr().err
    assert re.search(r"shard-00000\.tar: \d+ images, \d+\.\d MB; \d+/37 images", err)


def test_an_interrupted_run_resumes_keeping_the_complete_shards(
    tree, tmp_path, monkeypatch, capsys
):
    assert write_shards(tree, tmp_path / "whole") == 0
    out = tmp_path / "shards"
    real_put, puts = make_shards.LocalDest.put_file, []

    def interrupted_put(self, name, path):
        puts.append(name)
        if len(puts) == 3:
            raise KeyboardInterrupt
        real_put(self, name, path)

    monkeypatch.setattr(make_shards.LocalDest, "put_file", interrupted_put)
    assert write_shards(tree, out) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-00000.json",
        "shard-00000.tar",
        "shard-00001.json",
        "shard-00001.tar",
    ]  # no index, no partial shard
    first = (out / "shard-00000.tar").stat().st_mtime_ns
    capsys.readouterr()
    assert write_shards(tree, out) == 0
    err = capsys.readouterr().err
    assert err.count("complete from an earlier run, kept") == 2 and "shard-00002.tar: " in err
    assert (out / "shard-00000.tar").stat().st_mtime_ns == first  # not written again
    assert shard_index(out) == shard_index(tmp_path / "whole")
    for shard in shard_index(out)["shards"]:
        assert (out / shard["name"]).read_bytes() == (
            tmp_path / "whole" / shard["name"]
        ).read_bytes()


def test_resuming_with_another_seed_is_refused(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert write_shards(tree, out) == 0
    assert write_shards(tree, out, "--seed", 1) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: {out / 'shard-00000.tar'} holds other images than this run would put there (the "
        f"source, --seed or --shard-size-mb changed): write to an empty DEST"
    )


def test_max_side_re_encodes_only_the_images_longer_than_it(tree, tmp_path, capsys):
    """--max-side 40: an image whose longer side exceeds 40 is stored as a smaller JPEG of longer
    side 40 (its aspect kept, its pixels the original's, downscaled) under its own name and
    label; the others and the corrupt file byte for byte; the index cuts every member out as the
    system's tar extracts it. Resuming with another --max-side is refused."""
    shapes = {"dog/wide.png": (60, 90), "dog/tall.png": (100, 41), "dog/just.png": (41, 30)}
    expected_sizes = {"dog/wide.png": (40, 27), "dog/tall.png": (16, 40), "dog/just.png": (29, 40)}
    for i, (name, (h, w)) in enumerate(shapes.items()):
        Image.fromarray(photo_like(i, h, w)).save(tree / name)
    Image.fromarray(photo_like(9, 40, 32)).save(tree / "dog/fits.png")  # 40: not longer
    files = originals(tree)
    out = tmp_path / "shards"
    assert write_shards(tree, out, "--max-side", 40) == 0, capsys.readouterr().err
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    for shard in shard_index(out)["shards"]:
        assert shard["max_side"] == 40
        subprocess.run(["tar", "-xf", str(out / shard["name"]), "-C", str(extracted)], check=True)
        blob = (out / shard["name"]).read_bytes()
        for name, offset, length, label in shard["members"]:
            stored = (extracted / name).read_bytes()
            assert blob[offset : offset + length] == stored
            assert CLASSES[label] == name.split("/")[0]
            if name not in shapes:
                assert stored == files[name]
                continue
            image = Image.open(io.BytesIO(stored))
            assert image.format == "JPEG" and image.size == expected_sizes[name]
            assert len(stored) < len(files[name])
            original = Image.open(io.BytesIO(files[name])).resize(image.size, Image.BILINEAR)
            difference = np.abs(np.asarray(image, float) - np.asarray(original, float))
            # JPEG's loss on a tiny, noisy image: about 9; another of these images: about 43.
            assert difference.mean() < 15
    assert write_shards(tree, out) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out / 'shard-00000.tar'} was written with --max-side 40, this run has None: "
        f"write to an empty DEST"
    )


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--shard-size-mb", "0"], 2, "'0' is not a positive number of megabytes"),
        (["--concurrency", "0"], 2, "'0' is not a whole number of at least 1"),
        (["--max-side", "0"], 2, "'0' is not a whole number of at least 1"),
        (["--blob-list", "x.txt"], 1, "--blob-list is for a gs:// SOURCE"),
    ],
)
def test_bad_arguments_are_one_line(tree, tmp_path, capsys, args, code, message):
    try:
        rc = make_shards.main([str(tree), str(tmp_path / "out"), *args])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code and message in err and "Traceback" not in err


def test_a_missing_source_folder_is_one_line(tmp_path, capsys):
    assert make_shards.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: image folder {str(tmp_path / 'nope')!r} does not exist or is not a directory"
    ]


# ---------------------------------------------------------------------------------------------
# Reading local shards
# ---------------------------------------------------------------------------------------------


def test_local_shards_decode_like_the_files_and_a_corrupt_member_is_skipped(tree, tmp_path, caplog):
    out = tmp_path / "shards"
    assert write_shards(tree, out) == 0
    source = sources.open_folder(str(out / "index.json"), None, data_config(), sources.run_here)
    assert isinstance(source, shards.ShardSource) and source.classes == CLASSES
    images = source.load_many(range(len(source)))
    for name, label, image in zip(source.names, source.labels, images):
        if name == CORRUPT:
            assert isinstance(image, data.CorruptImageError)
            continue
        expected = np.asarray(Image.open(tree / name).convert("RGB"))
        assert np.array_equal(np.asarray(image.decode()), expected)
        assert CLASSES[label] == name.split("/")[0]
    # In training, the corrupt member is replaced, flagged and logged once with its shard.
    dataset = train_images(source)
    items = [(i, 0) for i in range(len(source))]
    with caplog.at_level("WARNING", logger="byol.data"):
        flagged = [
            int(x["corrupt"]) for x in dataset.__getitems__(items) + dataset.__getitems__(items)
        ]
    corrupt = source.names.index(CORRUPT)
    assert flagged == [int(i == corrupt) for i in range(len(source))] * 2
    shard = source.shard_names[source.shard_of[corrupt]]
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and f"{out / shard}:{CORRUPT}" in warnings[0]


def test_a_missing_or_cut_local_shard_fails_at_open_with_its_name(tree, tmp_path):
    out = tmp_path / "shards"
    assert write_shards(tree, out) == 0
    index = str(out / "index.json")
    blob = (out / "shard-00002.tar").read_bytes()
    (out / "shard-00002.tar").write_bytes(blob[:-1024])
    with pytest.raises(
        shards.MissingShardError,
        match=re.escape(
            f"shard {out / 'shard-00002.tar'} is {len(blob) - 1024} bytes but the index says {len(blob)}"
        ),
    ):
        sources.open_folder(index, None, data_config(), sources.run_here)
    (out / "shard-00002.tar").unlink()
    with pytest.raises(
        shards.MissingShardError, match=re.escape(f"shard {out / 'shard-00002.tar'} is missing")
    ):
        sources.open_folder(index, None, data_config(), sources.run_here)


@pytest.mark.parametrize(
    "content, blob_list, message",
    [
        ('{"a": 1}', None, "is not a shard index written by make_shards.py"),
        ("not json", None, "is not JSON"),
        (None, "list.txt", "is a shard index, which lists its images itself"),
    ],
)
def test_a_wrong_index_is_one_line(tree, tmp_path, content, blob_list, message):
    path = tmp_path / "index.json"
    path.write_text(content if content is not None else "{}")
    with pytest.raises(ConfigError, match=re.escape(message)):
        sources.open_folder(str(path), blob_list, data_config(), sources.run_here)


# ---------------------------------------------------------------------------------------------
# The epoch order
# ---------------------------------------------------------------------------------------------


COUNTS = list(np.random.default_rng(3).integers(20, 40, 50))  # 50 shards of 20-39 images


def shards_of(order, counts):
    return np.repeat(np.arange(len(counts)), counts)[np.asarray(order)]


@pytest.mark.parametrize("global_batch", [64, 96])
def test_each_slot_reads_a_contiguous_run_of_whole_shards(global_batch):
    order = shards.shard_epoch_order(7, 0, COUNTS, global_batch, lanes=8)
    batches = sum(COUNTS) // global_batch
    assert len(order) == len(set(order)) == batches * global_batch
    of = shards_of(order, COUNTS).reshape(batches, global_batch)
    for slots in (1, 2, 4, 8):
        per_slot = global_batch // slots
        read = [set(of[:, r * per_slot : (r + 1) * per_slot].ravel()) for r in range(slots)]
        # Neighbouring slots share at most the one shard at their boundary: the shards read
        # in all are the shards the epoch uses plus at most one per boundary.
        used = set(of.ravel())
        assert set().union(*read) == used and sum(map(len, read)) <= len(used) + slots - 1
        # The shards a slot reads are whole but for the two at its ends.
        for shard_set in read:
            images = [i for i in order if shards_of([i], COUNTS)[0] in shard_set]
            assert len(images) >= sum(COUNTS[s] for s in shard_set) - 2 * max(COUNTS)
    # A plain permutation would have every slot read nearly every shard.
    plain = shards_of(augment.epoch_permutation(7, 0, sum(COUNTS)), COUNTS)[
        : batches * global_batch
    ]
    assert len(set(plain.reshape(batches, global_batch)[:, : global_batch // 8].ravel())) > 40


def test_the_shard_order_is_a_seeded_function_shuffled_within_windows():
    order = shards.shard_epoch_order(7, 0, COUNTS, 64, lanes=8, window=2)
    assert order == shards.shard_epoch_order(7, 0, COUNTS, 64, lanes=8, window=2)
    assert order != shards.shard_epoch_order(7, 1, COUNTS, 64, lanes=8, window=2)
    assert order != shards.shard_epoch_order(8, 0, COUNTS, 64, lanes=8, window=2)
    lane0 = np.asarray(order).reshape(-1, 8, 8)[:, 0, :].ravel()  # chunk 0 of every batch
    of = shards_of(lane0, COUNTS)
    # Shuffled: consecutive images of a lane are not shard by shard...
    assert (np.diff(of) != 0).sum() > len(set(of)) * 3
    # ...but within windows: any 60 consecutive images (about two shards) span few shards.
    assert max(len(set(of[k : k + 60])) for k in range(len(of) - 60)) <= 6


def test_one_and_two_slots_see_the_same_images_every_batch():
    def global_batches(slots):
        order = lambda seed, epoch: shards.shard_epoch_order(seed, epoch, COUNTS, 64)  # noqa: E731
        sampler = data.EpochBatchSampler(sum(COUNTS), 64, slots, seed=5, order=order)
        out = []
        for _ in range(2):
            per_slot = list(sampler)
            out += [
                sum(per_slot[k * slots : (k + 1) * slots], [])
                for k in range(len(per_slot) // slots)
            ]
        return out

    one, two = global_batches(1), global_batches(2)
    assert one == two and len(one) == 2 * (sum(COUNTS) // 64)
    assert {i for b in one[: len(one) // 2] for i, _ in b} != {
        i for b in one[len(one) // 2 :] for i, _ in b
    }


# ---------------------------------------------------------------------------------------------
# GCS
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tree = write_tree(tmp_path_factory.mktemp("gcs") / "images")
    with FakeGCS() as server:
        bucket = server.client().create_bucket(BUCKET)
        for name, content in originals(tree).items():
            bucket.blob("ds/train/" + name).upload_from_string(content)
        bucket.blob("lists/train.txt").upload_from_string(
            "".join(f"ds/train/{n}\n" for n in originals(tree))
        )
        server.tree = tree
        yield server


@pytest.fixture
def gcs_env(server, monkeypatch):
    with talking_to(server, monkeypatch):
        yield server


def shard_gets(proxy, prefix):
    """Media GETs of shard objects under `prefix`, by shard name."""
    found = {}
    for method, path in proxy.requests:
        m = re.search(
            re.escape(prefix.replace("/", "%2F")) + r"(shard-\d{5}\.tar)\?.*alt=media", path
        )
        if method == "GET" and m:
            found[m.group(1)] = found.get(m.group(1), 0) + 1
    return found


@pytest.fixture(scope="module")
def gcs_shards(server):
    """ds/train written as shards to gs://BUCKET/shards/train/ (listing the prefix)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", server.host)
        assert write_shards(f"gs://{BUCKET}/ds/train", f"gs://{BUCKET}/shards/train") == 0
    return json.loads(
        server.client().bucket(BUCKET).blob("shards/train/index.json").download_as_bytes()
    )


def test_make_shards_reads_and_writes_gcs_and_the_blob_list_gives_the_same_shards(
    gcs_env, gcs_shards, tmp_path, capsys
):
    server = gcs_env
    bucket = server.client().bucket(BUCKET)
    files = originals(server.tree)
    members = [m for s in gcs_shards["shards"] for m in s["members"]]
    assert sorted(m[0] for m in members) == sorted(files) and gcs_shards["classes"] == CLASSES
    for shard in gcs_shards["shards"]:
        blob = bucket.blob("shards/train/" + shard["name"]).download_as_bytes()
        assert len(blob) == shard["size"]
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            assert [m.name for m in tar.getmembers()] == [m[0] for m in shard["members"]]
        for name, offset, length, _ in shard["members"]:
            assert blob[offset : offset + length] == files[name]
    assert (
        write_shards(
            f"gs://{BUCKET}/ds/train", tmp_path / "local", "--blob-list", "lists/train.txt"
        )
        == 0
    )
    assert shard_index(tmp_path / "local") == gcs_shards
    # Run again: every shard is kept, only the index is written.
    server.proxy.clear()
    assert write_shards(f"gs://{BUCKET}/ds/train", f"gs://{BUCKET}/shards/train") == 0
    assert capsys.readouterr().err.count("kept") == len(gcs_shards["shards"])
    assert not any(m in ("POST", "PUT") and "shard-" in p for m, p in server.proxy.requests)


def test_each_slot_fetches_its_own_shards_once_not_one_request_per_image(gcs_env, gcs_shards):
    """Four slots, each a process of its own with no cache: every slot fetches each shard it
    needs once, and the slots together fetch each shard once but for the few at the boundaries
    between their lanes."""
    server = gcs_env
    url = f"gs://{BUCKET}/shards/train/index.json"
    slots, fetched, images = 4, {}, 0
    for slot in range(slots):
        source = sources.open_folder(url, None, data_config(), sources.run_here)  # a fresh process
        dataset = train_images(source)
        sampler = data.EpochBatchSampler(
            len(source), 8, slots, seed=0, order=data.epoch_order(source, 8)
        )
        server.proxy.clear()
        mine = list(sampler)[slot::slots]  # Determined's round-robin share of slot `slot`
        images += sum(len(dataset.__getitems__(batch)) for batch in mine)
        gets = shard_gets(server.proxy, "shards/train/")
        drawn = {i for batch in mine for i, _ in batch}
        corrupt = source.names.index(CORRUPT)
        if corrupt in drawn:  # replaced by the next image, which may open the next shard
            drawn.add((corrupt + 1) % len(source))
        needed = {source.shard_names[source.shard_of[i]] for i in drawn}
        assert gets == {name: 1 for name in needed}  # each once, only its own
        assert len(server.proxy.requests) == len(needed)  # nothing per image
        for name in gets:
            fetched[name] = fetched.get(name, 0) + 1
    assert images == len(source) // 8 * 8
    assert len(fetched) <= len(gcs_shards["shards"])
    assert sum(fetched.values()) <= len(fetched) + slots - 1
    print(f"{images} images, {sum(fetched.values())} shard requests, {len(fetched)} shards")


def test_a_transient_shard_failure_is_retried(gcs_env, gcs_shards):
    server = gcs_env
    source = sources.open_folder(
        f"gs://{BUCKET}/shards/train/index.json", None, data_config(), sources.run_here
    )
    server.proxy.clear()
    server.proxy.fail_next(2, 503)
    image = source.load_many([0])[0]
    name = source.names[0]
    assert np.array_equal(
        np.asarray(image.decode()), np.asarray(Image.open(server.tree / name).convert("RGB"))
    )
    assert shard_gets(server.proxy, "shards/train/") == {source.shard_names[0]: 3}


def test_the_cache_holds_whole_shards_and_answers_without_requests(gcs_env, gcs_shards, tmp_path):
    server = gcs_env
    url = f"gs://{BUCKET}/shards/train/index.json"
    config = data_config(cache_dir=str(tmp_path / "cache"))
    source = sources.open_folder(url, None, config, sources.run_here)
    first = source.load_many(range(len(source)))
    assert shard_gets(server.proxy, "shards/train/") == {s["name"]: 1 for s in gcs_shards["shards"]}
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("shard-*.tar"))
    assert cached == [s["name"] for s in gcs_shards["shards"]]
    server.proxy.clear()
    server.proxy.fail_next(100, 500)  # any request now would fail
    fresh = shards.ShardSource(
        gcs_shards, shards.GCSShards(BUCKET, "shards/train/", config.cache_dir, 4), url
    )
    again = fresh.load_many(range(len(source)))
    assert server.proxy.requests == []
    for a, b in zip(first, again):
        assert isinstance(a, data.CorruptImageError) == isinstance(b, data.CorruptImageError)
        if not isinstance(a, data.CorruptImageError):
            assert np.array_equal(np.asarray(a.decode()), np.asarray(b.decode()))


def test_a_corrupt_member_on_gcs_is_skipped_and_counted(gcs_env, gcs_shards, caplog):
    source = sources.open_folder(
        f"gs://{BUCKET}/shards/train/index.json", None, data_config(), sources.run_here
    )
    dataset = train_images(source)
    with caplog.at_level("WARNING", logger="byol.data"):
        flagged = [
            int(x["corrupt"]) for x in dataset.__getitems__([(i, 0) for i in range(len(source))])
        ]
    corrupt = source.names.index(CORRUPT)
    assert flagged == [int(i == corrupt) for i in range(len(source))]
    shard = source.shard_names[source.shard_of[corrupt]]
    assert f"gs://{BUCKET}/shards/train/{shard}:{CORRUPT}" in caplog.text
    with pytest.raises(data.CorruptImageError, match=re.escape(f"{shard}:{CORRUPT}")):
        train_images(source, strict=True).__getitems__([(corrupt, 0)])


def test_a_missing_shard_fails_with_its_name(gcs_env, gcs_shards):
    server = gcs_env
    bucket = server.client().bucket(BUCKET)
    for name in ["index.json"] + [s["name"] for s in gcs_shards["shards"]]:
        bucket.copy_blob(bucket.blob("shards/train/" + name), bucket, "shards/gap/" + name)
    bucket.blob("shards/gap/shard-00001.tar").delete()
    source = sources.open_folder(
        f"gs://{BUCKET}/shards/gap/index.json", None, data_config(), sources.run_here
    )
    first = list(np.flatnonzero(source.shard_of == 1))[:2]
    with pytest.raises(
        shards.MissingShardError,
        match=re.escape(f"shard gs://{BUCKET}/shards/gap/shard-00001.tar is missing (404)"),
    ):
        source.load_many([0] + first)
    with pytest.raises(
        ConfigError, match=re.escape(f"gs://{BUCKET}/shards/none/index.json: not found (404)")
    ):
        sources.open_folder(
            f"gs://{BUCKET}/shards/none/index.json", None, data_config(), sources.run_here
        )


# ---------------------------------------------------------------------------------------------
# End to end (about 30 s each; -k "not training" leaves them out)
# ---------------------------------------------------------------------------------------------


def test_training_from_gcs_shards(gcs_env, tmp_path, image_folder, monkeypatch, caplog):
    from conftest import ROOT, assert_trains_and_validates_at_step_3, tiny_config

    server = gcs_env
    bucket = server.client().bucket(BUCKET)
    for split in ("train", "test"):
        for path in sorted((image_folder / split).rglob("*.png")):
            bucket.blob(
                f"folder/{split}/" + path.relative_to(image_folder / split).as_posix()
            ).upload_from_filename(str(path))
        assert write_shards(f"gs://{BUCKET}/folder/{split}", f"gs://{BUCKET}/fshards/{split}") == 0
    (tmp_path / "run").mkdir()
    config = tiny_config(tmp_path / "run", epochs=1, warmup_epochs=0, dataset_name="image_folder")
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(
        train_dir=f"gs://{BUCKET}/fshards/train/index.json",
        test_dir=f"gs://{BUCKET}/fshards/test/index.json",
        cache_dir=str(tmp_path / "cache"),
        num_workers=1,  # the shard store goes through a loader worker process
    )
    config.write_text(yaml.safe_dump(raw))
    server.proxy.clear()
    monkeypatch.chdir(ROOT)
    assert_trains_and_validates_at_step_3(config, tmp_path / "ckpt", caplog)
    for split in ("train", "test"):
        written = json.loads(bucket.blob(f"fshards/{split}/index.json").download_as_bytes())
        # Each shard fetched once (the cache and its lock serve the rest), no per-image request.
        assert shard_gets(server.proxy, f"fshards/{split}/") == {
            s["name"]: 1 for s in written["shards"]
        }
    assert not any("folder%2F" in p for _, p in server.proxy.requests)


def test_training_resumed_from_local_shards_is_exact(tmp_path, image_folder):
    from test_training import assert_resuming_step_4_reproduces, checkpoints_by_step, train

    from conftest import folder_overrides, tiny_config

    for split in ("train", "test"):
        assert write_shards(image_folder / split, tmp_path / "shards" / split) == 0
    config = tiny_config(tmp_path, epochs=2)
    shard_sets = [
        *data_dirs(
            tmp_path / "shards" / "train" / "index.json",
            tmp_path / "shards" / "test" / "index.json",
        ),
        "--set",
        "min_checkpoint_period={batches: 1}",
        "--set",
        "min_validation_period={batches: 100}",
    ]
    train(config, tmp_path / "full", *folder_overrides(image_folder), *shard_sets)
    full = checkpoints_by_step(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert_resuming_step_4_reproduces(full, config, image_folder, shard_sets, tmp_path / "resumed")
