"""Datasets read from their real on-disk formats; splits; the sampler; corrupt images."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import data
import probe
import sources
from config import ConfigError, _parse_augmentation, _Reader, parse_data_config
from conftest import CLASSES, photo_like, write_cifar10, write_stl10


def data_config(**kw):
    return parse_data_config(kw)


def as_chw(images):
    """[N, H, W, 3] as written -> [N, 3, H, W] as a source hands out."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_cifar10_python_batches(tmp_path, no_md5):
    written = write_cifar10(tmp_path, train_count=40, test_count=20)
    splits = data.build_splits("cifar10", data_config(download_dir=str(tmp_path)))
    assert splits.labeled_train is splits.byol_train
    assert splits.byol_train.classes[0] == "airplane"
    for source, (images, labels) in (
        (splits.byol_train, written["train"]),
        (splits.test, written["test"]),
    ):
        loaded = source.tensor(range(len(labels)))
        assert loaded.dtype == torch.uint8 and torch.equal(loaded, as_chw(images))
        assert np.array_equal(source.labels, labels)


def test_stl10_trains_byol_on_train_plus_unlabeled_and_the_probe_on_train(tmp_path, no_md5):
    written = write_stl10(tmp_path, train_count=10, unlabeled_count=12, test_count=6)
    splits = data.build_splits("stl10", data_config(download_dir=str(tmp_path)))
    # The binary is column-major and 1-based: the loaded images upright, the labels from 0.
    for source, (images, labels) in (
        (splits.labeled_train, written["train"]),
        (splits.test, written["test"]),
    ):
        assert torch.equal(source.tensor(range(len(labels))), as_chw(images))
        assert np.array_equal(source.labels, labels)
    train, unlabeled = written["train"][0], written["unlabeled"][0]
    assert torch.equal(
        splits.byol_train.tensor(range(22)), as_chw(np.concatenate([train, unlabeled]))
    )
    assert (splits.byol_train.labels[10:] == sources.UNLABELED).all()
    assert np.array_equal(splits.byol_train.labels[:10], written["train"][1])


def test_image_folder_with_unlabeled_images(image_folder, tmp_path):
    unlabeled = tmp_path / "unlabeled" / "any" / "nested"
    unlabeled.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (20, 24), (i * 40, 0, 0)).save(unlabeled / f"{i}.jpg")
    splits = data.build_splits(
        "image_folder",
        data_config(
            train_dir=str(image_folder / "train"),
            test_dir=str(image_folder / "test"),
            unlabeled_dir=str(tmp_path / "unlabeled"),
        ),
    )
    assert splits.labeled_train.classes == sorted(CLASSES)
    assert len(splits.labeled_train) == 24 and len(splits.byol_train) == 29
    assert list(splits.byol_train.labels[-5:]) == [sources.UNLABELED] * 5


def test_holdout_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), 10)
    fit, held = data.holdout_split(labels, 0.2, seed=3)
    assert len(held) == 8 and len(fit) == 32 and not set(fit) & set(held)
    assert all((labels[held] == c).sum() == 2 for c in range(4))
    fit2, held2 = data.holdout_split(labels, 0.2, seed=3)
    assert np.array_equal(held, held2)


def test_every_global_batch_holds_the_same_images_for_any_slot_count():
    def global_batches(slots):
        sampler = data.EpochBatchSampler(50, 8, slots, seed=1)
        out = []
        for _ in range(2):  # two epochs
            per_slot = list(sampler)
            assert len(per_slot) == len(sampler) == 6 * slots
            out += [sum(per_slot[k * slots : (k + 1) * slots], []) for k in range(6)]
        return out

    one, two = global_batches(1), global_batches(2)
    assert one == two
    first_epoch = {i for batch in one[:6] for i, _ in batch}
    assert len(first_epoch) == 48  # a permutation, 2 images dropped
    assert [i for i, _ in one[0]] != [i for i, _ in one[6]]  # reshuffled per epoch
    assert {e for _, e in one[6]} == {1}
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        data.EpochBatchSampler(5, 8, 1, seed=0)


def test_corrupt_image_is_skipped_logged_once_and_counted(image_folder, caplog):
    bad = image_folder / "train" / "cat" / "004.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    splits = data.build_splits(
        "image_folder",
        data_config(train_dir=str(image_folder / "train"), test_dir=str(image_folder / "test")),
    )
    source = splits.byol_train
    index = source.names.index("cat/004.png")
    aug = _parse_augmentation(_Reader({"image_size": 16}, "augmentation"))
    # Not fixed-size arrays: crops happen in the loader.
    dataset = data.TrainImages(
        source,
        augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1)),
        0,
        data.CorruptImageLog(strict=False),
    )
    with caplog.at_level("WARNING"):
        items = dataset.__getitems__([(index, 0), (0, 0)])
        dataset.__getitems__([(index, 1)])
    assert [int(i["corrupt"]) for i in items] == [1, 0]
    assert items[0]["image"].shape == (2, 3, 16, 16)
    warnings = [r for r in caplog.records if "cat/004.png" in r.getMessage()]
    assert len(warnings) == 1
    strict = data.TrainImages(
        source,
        augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1)),
        0,
        data.CorruptImageLog(strict=True),
    )
    with pytest.raises(data.CorruptImageError, match="cat/004.png: not a decodable image"):
        strict.__getitems__([(index, 0)])


def test_a_jpeg_cut_short_is_skipped_logged_once_counted_and_replaced(image_folder, caplog):
    """Its header reads, so load_many hands it out; its decode fails, and it goes the way of a
    corrupt image as before issue 27: replaced in training by the next image, cropped with its
    own key (as a copy of that next image in its place gives), flagged and logged once; strict
    mode stops with the line PIL's decode gives; validation leaves it out."""
    folder = image_folder / "train"
    pixels = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    whole = io.BytesIO()
    Image.fromarray(pixels).save(whole, format="JPEG")
    cut = folder / "cat" / "0035.jpg"  # sorts between 003.png and 004.png
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(OSError) as pil_error:
        Image.open(cut).convert("RGB")
    aug = _parse_augmentation(_Reader({"image_size": 12}, "augmentation"))

    def dataset(strict=False):
        names, labels, classes = sources.scan_class_folder(str(folder))
        source = sources.FileSource(
            names, labels, classes, sources.LocalFiles(str(folder)), str(folder)
        )
        plan = augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))
        return data.TrainImages(source, plan, 0, data.CorruptImageLog(strict)), names

    train, names = dataset()
    index = names.index("cat/0035.jpg")
    assert names[index + 1] == "cat/004.png"
    with caplog.at_level("WARNING"):
        items = train.__getitems__([(0, 0), (index, 0)]) + train.__getitems__([(index, 1)])
    assert [int(i["corrupt"]) for i in items] == [0, 1, 1]
    assert len([r for r in caplog.records if "cat/0035.jpg" in r.getMessage()]) == 1
    cut.write_bytes((folder / "cat" / "004.png").read_bytes())
    copied = dataset()[0].__getitems__([(index, 0)])[0]
    assert int(copied["corrupt"]) == 0 and torch.equal(copied["image"], items[1]["image"])
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(data.CorruptImageError) as error:
        dataset(strict=True)[0].__getitems__([(index, 0)])
    assert str(error.value) == f"{folder}/cat/0035.jpg: not a decodable image ({pil_error.value})"
    source = dataset()[0].source
    evaluation = data.EvalImages([(source, probe.SPLIT_TEST)], 12, data.CorruptImageLog(False))
    assert [int(evaluation[i]["valid"]) for i in (index, index + 1)] == [0, 1]


def test_evaluation_images_are_centre_cropped_to_the_training_size(image_folder):
    splits = data.build_splits(
        "image_folder",
        data_config(train_dir=str(image_folder / "train"), test_dir=str(image_folder / "test")),
    )
    ev = data.EvalImages(
        [(splits.labeled_train, probe.SPLIT_FIT), (splits.test, probe.SPLIT_TEST)],
        12,
        data.CorruptImageLog(False),
    )
    item = ev[len(splits.labeled_train)]
    assert item["image"].shape == (3, 12, 12) and int(item["split"]) == probe.SPLIT_TEST
    assert int(item["index"]) == len(splits.labeled_train)


class CountingFiles(sources.LocalFiles):
    """A local store that appends each name it reads to a file (visible across processes)."""

    def __init__(self, root, log):
        super().__init__(root)
        self.log = log

    def read(self, name):
        with open(self.log, "a") as f:
            f.write(name + "\n")
        return super().read(name)


def test_validation_decodes_each_image_once_per_run(image_folder, tmp_path):
    """Two validations through persistent loader workers read every file once."""
    names, labels, classes = sources.scan_class_folder(str(image_folder / "test"))
    log = tmp_path / "reads.txt"
    store = CountingFiles(str(image_folder / "test"), log)
    source = sources.FileSource(names, labels, classes, store, str(image_folder / "test"))
    dataset = data.EvalImages([(source, probe.SPLIT_TEST)], 12, data.CorruptImageLog(False))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=1, persistent_workers=True
    )
    passes = [torch.cat([b["image"] for b in loader]) for _ in range(2)]
    assert torch.equal(passes[0], passes[1])
    assert sorted(log.read_text().split()) == sorted(names)


def write_unlabeled_images(root, layout):
    """One photograph-like image at each relative path of `layout` (JPEG or PNG by its
    extension), each of its own size; returns the paths as written."""
    for i, name in enumerate(layout):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(i, 30 + i, 36)).save(root / name)
    return sorted(layout)


def test_a_flat_folder_of_images_is_a_training_set_with_a_held_out_part(tmp_path):
    """Only data.unlabeled_dir: every image is read, none has a label; 1 of the 12 (5%, at
    least 1) is held out of training for validation's loss, the rest train BYOL."""
    names = write_unlabeled_images(tmp_path / "flat", [f"img{i:02d}.jpg" for i in range(12)])
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    splits = data.build_splits("image_folder", data_config(unlabeled_dir=str(tmp_path / "flat")))
    assert splits.labeled_train is None
    listed = splits.byol_train.source
    assert listed.names == names and listed.classes == [] and splits.test.source is listed
    assert (listed.labels == sources.UNLABELED).all()
    assert splits.test.indices.tolist() == [0]
    assert splits.byol_train.indices.tolist() == list(range(1, 12))
    sizes = [(i.width, i.height) for i in splits.byol_train.load_many(range(11))]
    assert sizes == [(36, 31 + i) for i in range(11)]


def test_nested_folders_of_unlabeled_images_are_not_classes(tmp_path):
    """Folder names mean nothing: images at every depth, none labeled by its folder."""
    layout = ["2023/05/a.png", "2023/05/b.jpg", "2024/c.png", "top.jpeg", "x/y/z/deep.png"]
    write_unlabeled_images(tmp_path / "photos", layout)
    splits = data.build_splits("image_folder", data_config(unlabeled_dir=str(tmp_path / "photos")))
    # By folder, then by name in it (a bucket's listing is put in the same order).
    in_order = ["top.jpeg", "2023/05/a.png", "2023/05/b.jpg", "2024/c.png", "x/y/z/deep.png"]
    listed = splits.byol_train.source
    assert listed.names == in_order and listed.classes == []
    assert listed.labels.tolist() == [sources.UNLABELED] * len(layout)
    object_names = [f"bucket-prefix/{name}" for name in reversed(layout)]
    assert sources.image_object_names(object_names, "bucket-prefix/")[0] == in_order


def test_a_shard_set_as_unlabeled_images_keeps_its_images_not_its_labels(image_folder, tmp_path):
    import make_shards

    assert make_shards.main([str(image_folder / "train"), str(tmp_path / "shards")]) == 0
    index = str(tmp_path / "shards" / "index.json")
    labeled = sources.open_folder(index, None, data_config(), sources.run_here)
    splits = data.build_splits("image_folder", data_config(unlabeled_dir=index))
    # 24 images: the first (5%, at least 1; a shard set's first ones) held out, 23 train.
    assert splits.test.indices.tolist() == [0] and len(splits.byol_train) == 23
    assert len(splits.byol_train.source) == len(labeled) == 24
    assert splits.byol_train.classes == [] and (splits.byol_train.labels == sources.UNLABELED).all()
    assert sorted(set(labeled.labels.tolist())) == [0, 1, 2]  # the set itself is untouched
    first = splits.byol_train.load_many([0])[0].decode()
    assert np.array_equal(np.asarray(first), np.asarray(labeled.load_many([1])[0].decode()))


def test_a_shard_set_without_labels_holds_out_whole_shards(image_folder, tmp_path):
    """Several shards: the first whole shard is held out for the loss (24 images, 5% is 1, in
    the first shard), the others train as a shard set of their own, so that training still
    reads shard by shard (the sampler's shard order, not a permutation of every image)."""
    import make_shards

    dest = tmp_path / "shards"
    assert (
        make_shards.main([str(image_folder / "train"), str(dest), "--shard-size-mb", "0.001"]) == 0
    )
    index = str(dest / "index.json")
    whole = sources.open_folder(index, None, data_config(), sources.run_here)
    assert len(whole.shard_counts) > 2
    splits = data.build_splits("image_folder", data_config(unlabeled_dir=index))
    train, held = splits.byol_train, splits.test
    assert held.shard_names == whole.shard_names[:1] and len(held) == whole.shard_counts[0]
    assert train.shard_names == whole.shard_names[1:] and len(train) + len(held) == 24
    assert train.names == whole.names[len(held) :] and (train.labels == sources.UNLABELED).all()
    first = train.load_many([0])[0].decode()
    expected = whole.load_many([len(held)])[0].decode()
    assert np.array_equal(np.asarray(first), np.asarray(expected))
    assert data.epoch_order(train, 4) is not None  # the shard set's own order


def test_the_loss_of_a_large_unlabeled_set_holds_out_a_fixed_spread_sample():
    """5% of 300,007 is 15,000: capped at 10,000, spread evenly over the names (not the first
    ones), none of them trained on, the same on every call (no seed: every trial the same)."""
    count = data.LOSS_HOLDOUT_IMAGES * 30 + 7
    names = [f"{i:06d}.png" for i in range(count)]
    source = sources.FileSource(
        names, [sources.UNLABELED] * count, [], sources.LocalFiles("/x"), "/x"
    )
    train, held = data.loss_holdout(source)
    picked = held.indices.tolist()
    assert len(picked) == len(set(picked)) == data.LOSS_HOLDOUT_IMAGES
    assert picked[0] == 0 and picked[-1] == count - 1
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1  # evenly spread, not the first ones
    assert len(train) == count - 10_000 and not set(train.indices.tolist()) & set(picked)
    assert np.array_equal(data.loss_holdout(source)[1].indices, held.indices)
    small = sources.FileSource(
        names[:100], [sources.UNLABELED] * 100, [], sources.LocalFiles("/x"), "/x"
    )
    assert data.loss_holdout(small)[1].indices.tolist() == [0, 24, 49, 74, 99]  # 5 of 100


def test_empty_unlabeled_folders_and_flat_class_folders_say_what_is_expected(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no images: no file under it, at any depth"):
        data.build_splits("image_folder", data_config(unlabeled_dir=str(tmp_path / "empty")))
    write_unlabeled_images(tmp_path / "flat", ["a.png", "b.png"])
    flat = str(tmp_path / "flat")
    message = (
        f"image folder '{flat}' holds no images: expected {flat}/<class>/<image> files with "
        f"extensions {', '.join(sources.IMAGE_EXTENSIONS)} (images without labels, in any layout: "
        "data.unlabeled_dir)"
    )
    with pytest.raises(ConfigError) as error:
        data.build_splits("image_folder", data_config(train_dir=flat, test_dir=flat))
    assert str(error.value) == message
