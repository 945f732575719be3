"""GCS support against a real GCS JSON API server on 127.0.0.1: the gcp-storage-emulator, run
in this process, behind a proxy of our own (tests/gcs_server.py) that counts requests and can
answer with 503/429/403, drop or reset connections, or cut bodies short. The real
google-cloud-storage client reaches it through STORAGE_EMULATOR_HOST."""

import dataclasses
import io
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gcs_server
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package

import data  # noqa: E402
import gcs  # noqa: E402
import generate_blob_list  # noqa: E402
import sources  # noqa: E402
from config import ConfigError, DataConfig, parse_data_config
from conftest import talking_to, train_images  # noqa: E402
from gcs_server import FakeGCS  # noqa: E402

BUCKET = "byol-test"
CLASSES = ["bird", "cat", "dog"]  # sorted; uploaded in another order below


def _image(fmt: str, seed: int, size=(20, 14)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


# Relative to a split prefix. "cat/corrupt.png" is not an image; notes.txt, a loose image
# directly under the prefix and a hidden directory are not part of the dataset.
TREE = {
    "dog/d1.jpeg": _image("JPEG", 1),
    "dog/D2.PNG": _image("PNG", 2),
    "cat/c1.png": _image("PNG", 3),
    "cat/c2.jpg": _image("JPEG", 4),
    "cat/corrupt.png": b"\x89PNG\r\n\x1a\n this is not really a png",
    "bird/nested/b1.png": _image("PNG", 5),
    "bird/notes.txt": b"not an image",
    "loose.png": _image("PNG", 6),
    ".hidden/h1.png": _image("PNG", 7),
}
TRAIN_IMAGES = sorted(
    n
    for n in TREE
    if n.lower().endswith((".png", ".jpg", ".jpeg")) and "/" in n and not n.startswith(".")
)
EXPECTED_NAMES = [
    "bird/nested/b1.png",
    "cat/c1.png",
    "cat/c2.jpg",
    "cat/corrupt.png",
    "dog/D2.PNG",
    "dog/d1.jpeg",
]


@pytest.fixture(scope="module")
def server():
    with FakeGCS() as server:
        client = server.client()
        bucket = client.create_bucket(BUCKET)
        for split in ("ds/train/", "ds/test/"):
            for name, content in TREE.items():
                bucket.blob(split + name).upload_from_string(content)
        bucket.blob("only-text/readme.txt").upload_from_string(b"hello")
        # The blob list generate_blob_list.py would write for ds/train.
        bucket.blob("lists/train.txt").upload_from_string(
            "\n".join("ds/train/" + n for n in EXPECTED_NAMES) + "\n"
        )
        yield server


@pytest.fixture(autouse=True)
def clock(server, monkeypatch):
    """Every test talks to the proxy (conftest.talking_to): retries wait on a fake clock, which
    the proxy's timed faults share, so a deadline or a throttling episode passes as the client
    waits, at once and the same on any machine."""
    with talking_to(server, monkeypatch) as fake:
        yield fake


def data_config(**overrides) -> DataConfig:
    raw = {
        "train_dir": f"gs://{BUCKET}/ds/train",
        "test_dir": f"gs://{BUCKET}/ds/test",
        "num_workers": 0,
        "gcs_concurrency": 4,
    }
    raw.update(overrides)
    return parse_data_config(raw)


class CountingShare:
    """share() of a single process, counting how often it ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        return fn()


def list_requests(proxy):
    return [p for m, p in proxy.requests if m == "GET" and re.search(r"/b/[^/]+/o(\?|$)", p)]


def object_requests(proxy, object_name):
    quoted = object_name.replace("/", "%2F")
    return [p for _, p in proxy.requests if f"/o/{quoted}?" in p or p.endswith(f"/o/{quoted}")]


# ---------------------------------------------------------------------------------------------
# generate_blob_list.py
# ---------------------------------------------------------------------------------------------


def blob_list(path, output, *options, bucket=BUCKET):
    """generate_blob_list.py --bucket-name BUCKET --bucket-path PATH --output-file OUTPUT ..."""
    return generate_blob_list.main(
        ["--bucket-name", bucket, "--bucket-path", path, "--output-file", str(output), *options]
    )


def test_generate_blob_list_writes_summary_and_uploads(server, tmp_path, capsys):
    out = tmp_path / "train-blob-list.txt"
    rc = blob_list("ds/train", out, "--progress-every", "1", "--upload", "lists/generated.txt")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = out.read_text().splitlines()
    assert lines == [
        "ds/train/" + n for n in EXPECTED_NAMES
    ]  # notes.txt, loose and hidden left out
    summary = captured.out
    assert (
        re.search(r"^bird\s+1$", summary, re.M)
        and re.search(r"^cat\s+3$", summary, re.M)
        and re.search(r"^dog\s+2$", summary, re.M)
    )
    assert "6 images in 3 classes" in summary and "left out 2 images" in summary
    assert "listed 9 objects under gs://byol-test/ds/train/" in captured.err  # progress
    uploaded = server.client().bucket(BUCKET).blob("lists/generated.txt").download_as_bytes()
    assert uploaded.decode().splitlines() == lines
    assert [p.name for p in tmp_path.iterdir()] == ["train-blob-list.txt"]  # no temp file left


def test_generate_blob_list_extension_flag(tmp_path, capsys):
    out = tmp_path / "list.txt"
    rc = blob_list("ds/train/", out, "--extensions", "PNG,.txt")
    assert rc == 0, capsys.readouterr().err
    assert out.read_text().splitlines() == [
        "ds/train/" + n
        for n in [
            "bird/nested/b1.png",
            "bird/notes.txt",
            "cat/c1.png",
            "cat/corrupt.png",
            "dog/D2.PNG",
        ]
    ]
    assert "skip .txt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bucket, path, inject, message",
    [
        ("no-such-bucket", "x", None, "bucket gs://no-such-bucket does not exist (404)"),
        (BUCKET, "nothing/here", None, "no objects under gs://byol-test/nothing/here/"),
        (BUCKET, "only-text", None, "1 objects under gs://byol-test/only-text/ but no images"),
        (BUCKET, "ds/train", 403, "no permission to list gs://byol-test/ds/train/ (403)"),
        ("Bad_Bucket", "x", None, "'Bad_Bucket' is not a valid bucket name"),
    ],
)
def test_generate_blob_list_errors_are_one_line(
    server, tmp_path, capsys, bucket, path, inject, message
):
    if inject:
        server.proxy.fail_next(1, inject)
    out = tmp_path / "list.txt"
    rc = blob_list(path, out, bucket=bucket)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and message in errors[0], (err, server.proxy.requests)
    assert "Traceback" not in err and not out.exists()


def test_generate_blob_list_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        blob_list("ds", tmp_path / "x", "--extensions", ",,")
    assert exit_info.value.code == 2 and "not a comma-separated list" in capsys.readouterr().err


def test_generate_blob_list_unwritable_output(tmp_path, capsys):
    rc = blob_list("ds/train", tmp_path / "no-dir" / "x.txt")
    err = capsys.readouterr().err
    assert rc == 1 and "error: cannot write --output-file" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Opening a gs:// folder
# ---------------------------------------------------------------------------------------------


def test_open_by_listing_and_by_blob_list_agree(server):
    share = CountingShare()
    listed = sources.open_gcs_folder(f"gs://{BUCKET}/ds/train", None, data_config(), share)
    assert share.calls == 1 and len(list_requests(server.proxy)) == 1
    assert listed.names == EXPECTED_NAMES
    assert listed.classes == CLASSES  # sorted by name, like ImageFolder
    assert listed.labels.tolist() == [0, 1, 1, 1, 2, 2]

    server.proxy.clear()
    by_list = sources.open_gcs_folder(
        f"gs://{BUCKET}/ds/train/", "lists/train.txt", data_config(), share
    )
    assert list_requests(server.proxy) == []  # no listing with a blob list
    assert (by_list.names, by_list.labels.tolist(), by_list.classes) == (
        listed.names,
        listed.labels.tolist(),
        listed.classes,
    )
    assert by_list.store.read("cat/c1.png") == TREE["cat/c1.png"]


def test_build_splits_reads_gcs_folders(server):
    splits = data.build_splits(
        "image_folder", data_config(train_blob_list="lists/train.txt"), CountingShare()
    )
    assert splits.byol_train.classes == splits.test.classes == CLASSES
    assert len(splits.test) == len(splits.byol_train) == len(EXPECTED_NAMES)
    image = splits.test.load_many([splits.test.names.index("dog/d1.jpeg")])[0].decode()
    assert image.size == (20, 14) and image.mode == "RGB"


def test_a_gcs_prefix_of_unlabeled_images_trains_on_every_image_under_it(server):
    """Only data.unlabeled_dir: every image object at any depth (loose, hidden and nested ones
    too), none labeled by its folder; a prefix with no image says so."""
    splits = data.build_splits(
        "image_folder", parse_data_config({"unlabeled_dir": f"gs://{BUCKET}/ds/train"})
    )
    images = [n for n in TREE if n.lower().endswith((".png", ".jpg", ".jpeg"))]
    listed = splits.byol_train.source
    assert sorted(listed.names) == sorted(images) and splits.labeled_train is None
    assert listed.classes == [] and (listed.labels == sources.UNLABELED).all()
    assert len(splits.byol_train) + len(splits.test) == len(images)
    loaded = listed.load_many([listed.names.index("loose.png")])[0]
    assert loaded.decode().size == (20, 14)
    with pytest.raises(ConfigError, match=re.escape("only-text/<image> (at any depth) objects")):
        data.build_splits(
            "image_folder", parse_data_config({"unlabeled_dir": f"gs://{BUCKET}/only-text"})
        )


@pytest.mark.parametrize(
    "url, blob_list, overrides, message",
    [
        ("s3://bucket/x", None, {}, "'s3://bucket/x' is not a gs://BUCKET/PREFIX url"),
        ("gs://UPPER/x", None, {}, "'UPPER' is not a valid bucket name"),
        (
            f"gs://{BUCKET}/x",
            None,
            {"gcs_concurrency": 0},
            "data.gcs_concurrency=0 must be at least 1",
        ),
        ("gs://missing-bucket/x", None, {}, "gs://missing-bucket/x/: not found (404)"),
        (f"gs://{BUCKET}/only-text", None, {}, "holds no images: found 1 objects under it"),
        (
            f"gs://{BUCKET}/ds/train",
            "lists/missing.txt",
            {},
            "gs://byol-test/lists/missing.txt: not found (404)",
        ),
        (
            f"gs://{BUCKET}/ds/test",
            "lists/train.txt",
            {},
            "blob list gs://byol-test/lists/train.txt (for gs://byol-test/ds/test) names no images",
        ),
    ],
)
def test_open_errors_name_the_value(url, blob_list, overrides, message):
    # replace(), not parse_data_config: open_gcs_folder must also refuse what a parser let by.
    config = dataclasses.replace(data_config(), **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        sources.open_gcs_folder(url, blob_list, config, CountingShare())


def test_every_process_raises_when_the_chief_fails():
    """The chief's failure comes back through share() as a message, so no process waits."""
    answers = []

    def two_process_share(fn):
        answers.append(fn())  # the chief computes...
        return answers[-1]  # ...and every process gets the same answer

    for _ in range(2):
        with pytest.raises(ConfigError, match="not found"):
            sources.open_gcs_folder("gs://missing-bucket/x", None, data_config(), two_process_share)
    assert all(isinstance(a, str) for a in answers)


# ---------------------------------------------------------------------------------------------
# Reading: corrupt images, concurrency, pickling
# ---------------------------------------------------------------------------------------------


def test_corrupt_image_is_skipped_logged_once_and_counted(caplog):
    source = sources.open_gcs_folder(
        f"gs://{BUCKET}/ds/train", "lists/train.txt", data_config(), CountingShare()
    )
    dataset = train_images(source, strict=False)
    items = [(i, 0) for i in range(len(source))]
    with caplog.at_level("WARNING", logger="byol.data"):
        first = dataset.__getitems__(items)
        second = dataset.__getitems__(items)
    corrupt = source.names.index("cat/corrupt.png")
    assert [int(x["corrupt"]) for x in first] == [int(i == corrupt) for i in range(len(source))]
    assert sum(int(x["corrupt"]) for x in first + second) == 2  # counted every time it is drawn
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert (
        len(warnings) == 1 and "gs://byol-test/ds/train/cat/corrupt.png" in warnings[0]
    )  # logged once
    assert all(x["image"].shape == (2, 3, 16, 16) for x in first)  # replaced, so shapes stay fixed


def test_strict_mode_raises_with_the_name():
    source = sources.open_gcs_folder(
        f"gs://{BUCKET}/ds/train", "lists/train.txt", data_config(), CountingShare()
    )
    dataset = train_images(source, strict=True)
    with pytest.raises(data.CorruptImageError, match="gs://byol-test/ds/train/cat/corrupt.png"):
        dataset.__getitems__([(i, 0) for i in range(len(source))])


def test_data_loader_workers_read_through_their_own_client():
    """The dataset goes to worker processes (fork copies the parent's client, which must not be
    reused there); corrupt counts come back through the batches."""
    source = sources.open_gcs_folder(
        f"gs://{BUCKET}/ds/train", None, data_config(), CountingShare()
    )
    source.store.read(source.names[0])  # the parent now holds a client and a pool
    dataset = train_images(source, strict=False)
    sampler = data.EpochBatchSampler(len(source), global_batch=3, slots=1, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=2
    )
    batches = list(loader)
    assert len(batches) == 2 and sum(int(b["corrupt"].sum()) for b in batches) == 1
    assert all(b["image"].shape == (3, 2, 3, 16, 16) for b in batches)


def test_store_pickles_without_client_and_works_after():
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, 4)
    assert store.read("cat/c1.png") == TREE["cat/c1.png"]
    copy = pickle.loads(pickle.dumps(store))
    assert copy._state is None and copy.read_many(["dog/d1.jpeg", "cat/c2.jpg"]) == [
        TREE["dog/d1.jpeg"],
        TREE["cat/c2.jpg"],
    ]


def test_read_many_is_concurrent_bounded_and_ordered(server):
    server.proxy.latency_s = 0.03  # long enough that three requests surely overlap
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, concurrency=3)
    names = TRAIN_IMAGES * 2
    assert store.read_many(names) == [TREE[n] for n in names]
    assert server.proxy.max_in_flight == 3  # concurrent, never above the bound

    server.proxy.clear()
    serial = gcs.GCSFiles(BUCKET, "ds/train/", None, concurrency=1)
    assert serial.read_many(names) == [TREE[n] for n in names]
    assert server.proxy.max_in_flight == 1


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_hit_makes_no_request(server, tmp_path):
    cache = tmp_path / "cache"
    source = sources.open_gcs_folder(
        f"gs://{BUCKET}/ds/train",
        "lists/train.txt",
        data_config(cache_dir=str(cache)),
        CountingShare(),
    )
    first = source.store.read_many(source.names)
    assert len(server.proxy.requests) == 1 + len(source.names)  # the blob list, then each object

    server.proxy.clear()
    server.proxy.fail_next(100, 500)  # any request now would fail
    fresh = gcs.GCSFiles(BUCKET, "ds/train/", str(cache), 4)  # a new process's view of it
    assert fresh.read_many(source.names) == first == [TREE[n] for n in source.names]
    assert server.proxy.requests == []
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert len(files) == len(source.names) and not any(p.name.startswith("%tmp-") for p in files)
    assert (cache / BUCKET / "ds" / "train" / "cat" / "c1.png").read_bytes() == TREE["cat/c1.png"]


HOSTILE = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "",
    "a/../../b",
    "a/./b",
    "a//b",
    "a/",
    "/",
    "..\\..\\x",
    "C:\\Windows\\x",
    "a\x00b",
    "%2E%2E/x",
    "%",
    "%2E",
    "%tmp-x",
    "%h00",
    "~/x",
    "é/ü.png",
    "\n/\r",
    "x" * 300,
    "x" * 301,
    "a" * 100 + "/" + "b" * 1000,
]


def test_cache_paths_stay_inside_and_never_collide(tmp_path):
    root = str(tmp_path / "cache")
    paths = [gcs.gcs_cache_path(root, BUCKET, name) for name in HOSTILE]
    for name, path in zip(HOSTILE, paths):
        assert os.path.commonpath([root, path]) == root, name
        assert os.path.realpath(path).startswith(os.path.realpath(root) + os.sep), name
        rest = os.path.relpath(path, root).split(os.sep)
        assert all(part not in ("", ".", "..") and len(part) <= 255 for part in rest), (name, rest)
        assert not any(c in path[len(root) :] for c in "\\\x00\n\r:"), name
    assert len(set(paths)) == len(paths)  # one file per object
    assert gcs.gcs_cache_path(root, BUCKET, "../x").endswith(os.path.join(BUCKET, "%2E%2E", "x"))


def test_hostile_names_are_cached_inside_the_cache_dir(server, tmp_path, monkeypatch):
    # Names the emulator stores: read through the server.
    stored = ["/abs.png", "a\\evil.png", "C:\\x.png", "a//b.png", "a/%2E%2E/x.png", "a/é.png"]
    bucket = server.client().bucket(BUCKET)
    for name in stored:
        bucket.blob("hostile/" + name).upload_from_string(name.encode())
    cache = tmp_path / "cache"
    store = gcs.GCSFiles(BUCKET, "hostile/", str(cache), 4)
    assert store.read_many(stored) == [n.encode() for n in stored]
    # Names the emulator refuses to store ('..' components, also between backslashes): the
    # download is faked, the cache is real.
    monkeypatch.setattr(gcs, "download_object", lambda client, b, name: name.encode())
    dotted = ["../../../outside.png", "./.", "..\\..\\evil.png", "x/../../../../tmp/evil.png"]
    root_store = gcs.GCSFiles(BUCKET, "", str(cache), 4)
    assert root_store.read_many(dotted) == [n.encode() for n in dotted]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing written outside
    assert len([p for p in cache.rglob("*") if p.is_file()]) == len(stored) + len(dotted)
    assert store.read_many(stored) == [n.encode() for n in stored]  # read back from the cache


def test_object_and_prefix_of_the_same_name_still_read(tmp_path, monkeypatch, caplog):
    """GCS can hold both 'a' and 'a/b'; a disk cannot hold 'a' as a file and a directory. The
    second one is then read uncached, with the right bytes; nothing is overwritten."""
    monkeypatch.setattr(gcs, "download_object", lambda client, b, name: name.encode())
    store = gcs.GCSFiles(BUCKET, "", str(tmp_path / "cache"), 1)
    with caplog.at_level("WARNING", logger="byol.data"):
        for order in (["a", "a/b"], ["c/d", "c"]):
            assert store.read_many(order * 2) == [n.encode() for n in order * 2]
    assert len([r for r in caplog.records if "cannot write the GCS cache" in r.getMessage()]) == 1


def test_unwritable_cache_still_reads(tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    store = gcs.GCSFiles(BUCKET, "ds/train/", str(blocker), 2)
    with caplog.at_level("WARNING", logger="byol.data"):
        assert store.read_many(["cat/c1.png", "dog/d1.jpeg"]) == [
            TREE["cat/c1.png"],
            TREE["dog/d1.jpeg"],
        ]
    assert len([r for r in caplog.records if "cannot write the GCS cache" in r.getMessage()]) == 1


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "429", "500", "drop", "reset", "truncate"])
def test_transient_failures_are_retried(server, fault):
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, 1)
    if fault.isdigit():
        server.proxy.fail_next(3, int(fault))
    else:
        getattr(server.proxy, f"{fault}_next")(3)
    assert store.read("cat/c1.png") == TREE["cat/c1.png"]
    assert len(object_requests(server.proxy, "ds/train/cat/c1.png")) == 4


def test_retries_survive_faults_in_a_concurrent_batch(server):
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, 4)
    server.proxy.fail_next(4, 503)
    server.proxy.drop_next(2)
    assert store.read_many(TRAIN_IMAGES) == [TREE[n] for n in TRAIN_IMAGES]
    assert len(server.proxy.requests) == len(TRAIN_IMAGES) + 6


def test_listing_is_retried(server):
    server.proxy.fail_next(2, 503)
    names = gcs.list_gcs_objects(gcs.gcs_client(), BUCKET, "ds/train/")
    assert len(names) == len(TREE) and len(list_requests(server.proxy)) == 3


def test_retries_stop_at_the_deadline(server, monkeypatch, clock):
    monkeypatch.setattr(gcs, "GCS_RETRY_DEADLINE_S", 0.3)
    monkeypatch.setattr(gcs, "GCS_RETRY_BASE_S", 0.02)
    monkeypatch.setattr(gcs, "GCS_RETRY_CAP_S", 0.05)
    server.proxy.fail_for(30, 503)
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, 1)
    with pytest.raises(gcs.GCSError, match=r"cat/c1.png: still failing after \d+ attempts in") as e:
        store.read("cat/c1.png")
    assert e.value.status == 503 and e.value.transient
    assert "(retry deadline 0.3 s)" in str(e.value)
    # It waited between its attempts, never past the deadline, and stopped within one wait of it.
    attempts = len(object_requests(server.proxy, "ds/train/cat/c1.png"))
    assert len(clock.sleeps) == attempts - 1 and all(0 <= s <= 0.05 for s in clock.sleeps)
    assert 0.3 - 0.05 < sum(clock.sleeps) <= 0.3


def test_a_throttling_episode_longer_than_the_old_retry_budget_is_survived(
    server, monkeypatch, clock
):
    """Six attempts with backoff from 0.1 s (the old budget) sleep 3.1 s at most; 503s for 4 s
    used to kill the loader worker. With the deadline the read waits the episode out."""
    monkeypatch.setattr(gcs, "GCS_RETRY_BASE_S", 0.1)
    monkeypatch.setattr(gcs, "GCS_RETRY_CAP_S", 0.5)
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, 1)
    server.proxy.fail_for(4.0, 503)
    assert store.read("cat/c1.png") == TREE["cat/c1.png"]
    attempts = len(object_requests(server.proxy, "ds/train/cat/c1.png"))
    print(f"503s for 4 s: read after {attempts} requests, {sum(clock.sleeps):.1f} s of waits")
    assert sum(clock.sleeps) >= 4.0 and attempts > 6 and len(clock.sleeps) == attempts - 1


@pytest.mark.parametrize("strict", [False, True])
def test_an_image_unreadable_past_the_deadline_is_skipped_or_refused(server, monkeypatch, strict):
    monkeypatch.setattr(gcs, "GCS_RETRY_DEADLINE_S", 0.3)
    server.proxy.fail_for(30, 503, path_contains="ds/train/cat/c1.png")
    source = sources.open_gcs_folder(
        f"gs://{BUCKET}/ds/train", None, data_config(), CountingShare()
    )
    dataset = train_images(source, strict)
    items = [(i, 0) for i in range(len(source))]
    if strict:
        with pytest.raises(data.CorruptImageError, match="gs://byol-test/ds/train/cat/c1.png"):
            dataset.__getitems__(items[: source.names.index("cat/corrupt.png")])
        return
    flagged = [int(item["corrupt"]) for item in dataset.__getitems__(items)]
    unreadable = {source.names.index("cat/c1.png"), source.names.index("cat/corrupt.png")}
    assert flagged == [int(i in unreadable) for i in range(len(source))]


@pytest.mark.parametrize(
    "name, status, says",
    [("cat/missing.png", 404, "not found (404)"), ("cat/c1.png", 403, "permission denied (403)")],
    ids=["not-found", "forbidden"],
)
def test_a_permanent_error_fails_at_once(server, clock, name, status, says):
    if status == 403:
        server.proxy.fail_next(1, 403)
    store = gcs.GCSFiles(BUCKET, "ds/train/", None, 1)
    with pytest.raises(
        gcs.GCSError, match=re.escape(f"gs://byol-test/ds/train/{name}: {says}")
    ) as e:
        store.read(name)
    assert e.value.status == status and len(server.proxy.requests) == 1
    assert clock.sleeps == []  # a permanent error is never waited on


def test_backoff_is_exponential_jittered_and_capped(monkeypatch):
    from google.api_core import exceptions

    monkeypatch.setattr(gcs, "GCS_RETRY_BASE_S", 0.1)
    monkeypatch.setattr(gcs, "GCS_RETRY_CAP_S", 0.5)
    attempts, sleeps = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 6:
            raise exceptions.ServiceUnavailable("busy")
        return "ok"

    assert gcs.call_with_retries("gs://b/o", flaky, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 5
    for k, delay in enumerate(sleeps):
        assert 0 <= delay <= min(0.5, 0.1 * 2**k)
    # Full jitter: over many draws the delays spread over [0, bound], not one fixed value.
    many = []
    for _ in range(50):
        attempts.clear()
        gcs.call_with_retries("gs://b/o", flaky, sleep=many.append)
    assert len(set(many)) > 200 and max(many) > 0.4

    sleeps.clear()
    with pytest.raises(gcs.GCSError):
        gcs.call_with_retries(
            "gs://b/o",
            lambda: (_ for _ in ()).throw(exceptions.NotFound("gone")),
            sleep=sleeps.append,
        )
    assert sleeps == []  # permanent errors never wait


# ---------------------------------------------------------------------------------------------
# End to end: a short training run reading from the emulator (about 20 s; -k "not training"
# leaves it out)
# ---------------------------------------------------------------------------------------------


def test_training_reads_from_gcs(server, tmp_path, image_folder, monkeypatch, caplog):
    import yaml

    from conftest import ROOT, assert_trains_and_validates_at_step_3, tiny_config

    bucket = server.client().bucket(BUCKET)
    for path in sorted(image_folder.rglob("*.png")):  # train/<class>/*.png, test/<class>/*.png
        bucket.blob("folder/" + path.relative_to(image_folder).as_posix()).upload_from_filename(
            str(path)
        )
    assert (
        blob_list("folder/train", tmp_path / "list.txt", "--upload", "lists/folder-train.txt") == 0
    )
    (tmp_path / "run").mkdir()
    config = tiny_config(tmp_path / "run", epochs=1, warmup_epochs=0, dataset_name="image_folder")
    cache = tmp_path / "cache"
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(
        train_dir=f"gs://{BUCKET}/folder/train",
        test_dir=f"gs://{BUCKET}/folder/test",
        train_blob_list="lists/folder-train.txt",  # the test split is listed instead
        cache_dir=str(cache),
        num_workers=1,  # the store goes through a loader worker process
    )
    config.write_text(yaml.safe_dump(raw))
    server.proxy.clear()
    monkeypatch.chdir(ROOT)
    assert_trains_and_validates_at_step_3(config, tmp_path / "ckpt", caplog)
    assert len(list_requests(server.proxy)) == 1  # only the test split was listed
    cached = [p for p in cache.rglob("*.png")]
    assert len(cached) == 36  # every train and test image was read, and cached


def test_the_checksum_error_of_this_google_cloud_storage_is_transient():
    """A download whose bytes fail their checksum raises the DataCorruption that blob.py itself
    catches: google-cloud-storage's own in 3.x, google-resumable-media's in 2.x (Determined's
    default image). Either is retried."""
    from google.cloud.storage import blob

    raised = getattr(blob, "DataCorruption", None) or blob.resumable_media.DataCorruption
    assert gcs._is_transient(raised(None, "Checksum mismatch while downloading"))
