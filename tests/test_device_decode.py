"""data.decode_on: gpu, checked on the CPU: the loader workers ship JPEG bytes and both views'
boxes, the training process decodes them in one batched torchvision.io.decode_jpeg call (nvJPEG
on a GPU; here the same call with device="cpu") and cuts the crops there. Against the loader's
own decode: the same boxes, the same crops (for JPEGs under images.REDUCED_DECODE_MIN_PIXELS the
same decoder and resize, so the same pixels; above it the loader decodes at a reduced size and
the difference is measured), the same one-line log for a corrupt image, other formats decoded
by the loader as before."""

import logging

import pytest
import torch
from PIL import Image

import augment
import data
import device_decode
import model_def
import sources
from config import ConfigError, _parse_augmentation, _Reader, parse_experiment_config
from conftest import CLASSES, folder_overrides, photo_like, tiny_config

SIZE = 16


def write_jpeg_folder(root, truncated=None):
    """train/<class>/ of photograph-like JPEGs (colour and grey, 40-64 px) and one PNG a class,
    test/<class>/ of 4 JPEGs; `truncated`: (class, name) of a JPEG cut in half (its header
    reads, its pixels do not)."""
    for split, count in (("train", 8), ("test", 4)):
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = photo_like(
                    100 * label + i + (1000 if split == "test" else 0), 40 + 3 * i, 64
                )
                image = Image.fromarray(pixels)
                if i == 1:
                    image = image.convert("L")
                if split == "train" and i == count - 1:
                    image.save(root / split / cls / f"{i:03d}.png")
                    continue
                image.save(root / split / cls / f"{i:03d}.jpg", quality=90)
    if truncated:
        path = root / "train" / truncated[0] / truncated[1]
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    return root


def dataset_of(folder, decode_on_device, strict=False):
    names, labels, classes = sources.scan_class_folder(str(folder))
    source = sources.FileSource(
        names, labels, classes, sources.LocalFiles(str(folder)), str(folder)
    )
    aug = _parse_augmentation(_Reader({"image_size": SIZE}, "augmentation"))
    two_view = augment.TwoViewAugmentation(aug, (0.5,) * 3, (0.25,) * 3)
    log = data.CorruptImageLog(strict)
    return data.TrainImages(source, two_view, 0, log, decode_on_device=decode_on_device), source


def batch_of(dataset, indices, epoch=0):
    return dataset.collate(dataset.__getitems__([(i, epoch) for i in indices]))


def test_the_device_decodes_the_loaders_crops_from_its_boxes(tmp_path):
    folder = write_jpeg_folder(tmp_path / "images") / "train"
    loader, source = dataset_of(folder, decode_on_device=False)
    on_device, _ = dataset_of(folder, decode_on_device=True)
    indices = list(range(len(source)))
    expected = batch_of(loader, indices)
    shipped = batch_of(on_device, indices)
    # Only bytes and boxes of the 21 JPEGs travel; the 3 PNGs come cropped, as before.
    pngs = [i for i in indices if source.names[i].endswith(".png")]
    assert shipped["image_rows"].tolist() == pngs and len(pngs) == 3
    assert shipped["jpeg_rows"].tolist() == [i for i in indices if i not in pngs]
    assert shipped["jpeg"].numel() == sum(
        (folder / source.names[i]).stat().st_size for i in shipped["jpeg_rows"].tolist()
    )
    # The boxes are the loader's: from the seed, epoch, index, view and the header's size.
    for j, i in enumerate(shipped["jpeg_rows"].tolist()):
        with Image.open(folder / source.names[i]) as image:
            width, height = image.size
        key = augment.item_keys(0, [(i, 0)])
        for view in (0, 1):
            box = on_device.augment.crop_boxes(
                key, view, torch.tensor([height]), torch.tensor([width])
            )
            assert torch.equal(shipped["jpeg_boxes"][j, view], box[0])
    crops = device_decode.crops(shipped, SIZE, torch.device("cpu"), source.location, None)
    assert crops.dtype == torch.uint8 and crops.shape == (len(indices), 2, 3, SIZE, SIZE)
    assert torch.equal(crops, expected["image"])
    assert torch.equal(shipped["key"], expected["key"])


def test_a_large_jpeg_differs_from_the_loaders_reduced_decode_by_a_stated_bound(tmp_path):
    """A 1,600 x 1,200 JPEG (above REDUCED_DECODE_MIN_PIXELS) with 16-px views: the loader
    decodes it at 1/8 in the DCT domain and resizes by PIL, the device decodes it whole and
    resizes by torch. Measured over 40 views of this photograph-like image: mean |difference|
    0.50 of 255 and the largest 18; the bound stated here is 1.0 and 30."""
    root = tmp_path / "large" / "c"
    root.mkdir(parents=True)
    Image.fromarray(photo_like(7, 1200, 1600)).save(root / "big.jpg", quality=90)
    loader, source = dataset_of(root.parent, decode_on_device=False)
    on_device, _ = dataset_of(root.parent, decode_on_device=True)
    differences = []
    for epoch in range(20):
        expected = batch_of(loader, [0], epoch)["image"].int()
        shipped = batch_of(on_device, [0], epoch)
        crops = device_decode.crops(shipped, SIZE, torch.device("cpu"), source.location, None)
        differences.append((crops.int() - expected).abs())
    difference = torch.stack(differences).float()
    print(f"mean |difference| {difference.mean():.2f}, largest {difference.max():.0f}")
    assert difference.mean() <= 1.0 and difference.max() <= 30


def test_a_jpeg_the_decoder_refuses_is_logged_once_and_replaced_in_its_batch(tmp_path, caplog):
    folder = write_jpeg_folder(tmp_path / "images", truncated=(CLASSES[1], "002.jpg")) / "train"
    on_device, source = dataset_of(folder, decode_on_device=True)
    bad = source.names.index(f"{CLASSES[1]}/002.jpg")
    shipped = batch_of(on_device, list(range(len(source))))
    assert bad in shipped["jpeg_rows"].tolist()  # its header reads: the loader cannot tell

    def logged(run):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="byol.data"):
            result = run()
        lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
        return result, lines

    # The loader's own line for it, as it decodes it (a second dataset, its own log).
    loader, _ = dataset_of(folder, decode_on_device=False)
    _, loader_lines = logged(lambda: batch_of(loader, list(range(len(source)))))
    assert len(loader_lines) == 1 and f"{folder}/{CLASSES[1]}/002.jpg" in loader_lines[0]

    def twice():  # a second batch with it: still one line
        for _ in range(2):
            batch = dict(shipped, corrupt=shipped["corrupt"].clone())
            crops = device_decode.crops(
                batch, SIZE, torch.device("cpu"), source.location, on_device.corrupt_log
            )
        return batch, crops

    (batch, crops), lines = logged(twice)
    assert lines == loader_lines
    assert batch["corrupt"].tolist() == [int(i == bad) for i in range(len(source))]
    first_good = 0 if bad != 0 else 1
    assert torch.equal(crops[bad], crops[first_good])
    strict, _ = dataset_of(folder, decode_on_device=True, strict=True)
    with pytest.raises(Exception, match="002.jpg: not a decodable image"):
        device_decode.crops(
            dict(shipped, corrupt=shipped["corrupt"].clone()),
            SIZE,
            torch.device("cpu"),
            source.location,
            strict.corrupt_log,
        )


def test_a_run_decoding_on_the_device_trains_as_one_decoding_in_the_loader(
    tmp_path, monkeypatch, caplog
):
    """Two epochs on JPEGs (and a PNG a class), the training process decoding them (the CPU
    here stands in for the GPU): the training losses are the loader-decoded run's, bit for
    bit, since the crops are the same pixels."""
    folder = write_jpeg_folder(tmp_path / "images")
    decoded = []
    real_crops = device_decode.crops
    monkeypatch.setattr(
        device_decode,
        "crops",
        lambda batch, *a: decoded.append(len(batch["jpeg_rows"])) or real_crops(batch, *a),
    )

    def losses(run, decode_here):
        monkeypatch.setattr(data, "decodes_on_device", lambda *args: decode_here)
        (tmp_path / run).mkdir()
        args = [str(tiny_config(tmp_path / run)), "--checkpoint-dir", str(tmp_path / run / "ckpt")]
        for s in [*folder_overrides(folder)[1::2], "hyperparameters.augment_on=device"]:
            args += ["--set", s]
        caplog.clear()
        with caplog.at_level("INFO"):
            model_def.main(args)
        return [
            r.getMessage().split("'loss': ")[1].split(",")[0]
            for r in caplog.records
            if "report_training_metrics" in r.getMessage()
        ]

    decoded_here = losses("device", True)
    # Each of the 6 steps decoded its batch's JPEGs here: every epoch draws all 24 images, of
    # which 3 are PNGs (the loader's).
    assert len(decoded) == 6 and sum(decoded) == 2 * (24 - 3)
    assert len(decoded_here) == 6 and decoded_here == losses("loader", False)
    assert len(decoded) == 6  # none more for the loader-decoded run


@pytest.mark.parametrize(
    "sets,line",
    [
        (
            {"data": {"decode_on": "nvjpeg"}},
            "data.decode_on='nvjpeg' is not one of: auto, cpu, gpu",
        ),
        (
            {"data": {"decode_on": "gpu"}},
            "data.decode_on=gpu: hyperparameters.dataset_name=cifar10 comes decoded (arrays); "
            "only image_folder images are decoded. Leave data.decode_on at auto",
        ),
        (
            {
                "data": {"decode_on": "gpu", "train_dir": "/x/train", "test_dir": "/x/test"},
                "hyperparameters": {"dataset_name": "image_folder", "augment_on": "loader"},
            },
            "data.decode_on=gpu decodes on the training device, so the views are made there: "
            "hyperparameters.augment_on=loader cannot be; set it to auto or device",
        ),
    ],
)
def test_a_decode_on_that_cannot_work_is_refused_in_one_line(tmp_path, sets, line):
    import yaml

    raw = yaml.safe_load(open(tiny_config(tmp_path)))
    for section, values in sets.items():
        raw[section].update(values)
    with pytest.raises(ConfigError) as refused:
        parse_experiment_config(raw)
    assert str(refused.value) == line


def test_auto_decodes_on_a_gpu_for_shard_sets_only_and_gpu_needs_one(tmp_path):
    import shards

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    shard_set = shards.ShardSource.__new__(shards.ShardSource)
    folder = sources.FileSource([], [], [], sources.LocalFiles("/x"), "/x")
    assert data.decodes_on_device("auto", cuda, shard_set) is True
    assert data.decodes_on_device("auto", cuda, folder) is False
    assert data.decodes_on_device("auto", cpu, shard_set) is False
    assert data.decodes_on_device("cpu", cuda, shard_set) is False
    assert data.decodes_on_device("gpu", cuda, folder) is True
    with pytest.raises(ConfigError) as refused:
        data.decodes_on_device("gpu", cpu, folder)
    assert str(refused.value) == (
        "data.decode_on=gpu decodes on the training GPU (nvJPEG), and this trial trains on "
        "cpu: set data.decode_on=auto or cpu"
    )


def test_fine_tuning_refuses_gpu_decoding_in_one_line(tmp_path, image_folder):
    from config import parse_finetune_config
    from conftest import tiny_finetune_config

    config = tiny_finetune_config(tmp_path, image_folder)
    config["data"]["decode_on"] = "gpu"
    with pytest.raises(ConfigError) as refused:
        parse_finetune_config(config)
    assert str(refused.value) == (
        "data.decode_on=gpu is for BYOL pretraining; fine-tuning decodes its labeled images in "
        "the loader: leave data.decode_on at auto"
    )
