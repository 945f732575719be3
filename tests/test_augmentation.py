"""The batched two-view augmentation samples what torchvision's per-image pipeline samples, and
its pixel operations compute what torchvision's functional ops compute."""

import itertools
import pathlib
import subprocess
import time
import types

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torchvision import transforms

import augment
import data
import sources
from benchmarks.op_count import OpCounter
from config import _parse_augmentation, _Reader
from conftest import HANG_GUARD_S, ROOT, fetch_commit_if_missing

N = 4000


def augmentation(**overrides):
    raw = {"image_size": 32}
    raw.update(overrides)
    return _parse_augmentation(_Reader(raw, "augmentation"))


def test_splitmix64_matches_the_reference_on_int64_tensors():
    def reference(x):
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    values = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 62, 0xDEADBEEF]
    out = augment.splitmix64(torch.tensor([augment._signed(v) for v in values]))
    assert [v & ((1 << 64) - 1) for v in out.tolist()] == [reference(v) for v in values]


def test_uniforms_are_uniform_and_independent_per_key_and_stream():
    keys = augment.sample_keys(0, 0, torch.arange(N))
    u = augment.uniforms(keys, 3, stream=0)
    assert u.min() >= 0 and u.max() < 1
    for column in range(3):
        assert stats.kstest(u[:, column].numpy(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05
    other = augment.uniforms(keys, 3, stream=1)
    assert abs(np.corrcoef(u[:, 0], other[:, 0])[0, 1]) < 0.05
    assert not torch.equal(
        augment.sample_keys(0, 1, torch.arange(5)), augment.sample_keys(0, 0, torch.arange(5))
    )
    assert not torch.equal(
        augment.sample_keys(1, 0, torch.arange(5)), augment.sample_keys(0, 0, torch.arange(5))
    )


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.2, 1.0)), (120, 200, (0.08, 1.0))])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    aug = augmentation(crop_scale=list(scale))
    planner = augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))
    keys = augment.sample_keys(3, 0, torch.arange(N))
    boxes = planner.crop_boxes(keys, 0, torch.full((N,), height), torch.full((N,), width)).numpy()
    ours_w, ours_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (
        (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    )

    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array(
        [
            transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
            for _ in range(N)
        ]
    )
    their_top, their_left, their_h, their_w = theirs.T
    for ours, theirs_ in (
        (ours_w * ours_h / (height * width), their_w * their_h / (height * width)),  # area
        (ours_w / ours_h, their_w / their_h),  # aspect
        (boxes[:, 1], their_top),  # vertical position
        (boxes[:, 0], their_left),  # horizontal position
    ):
        assert stats.ks_2samp(ours, theirs_).pvalue > 1e-3


def test_view_parameters_follow_the_paper_recipe():
    aug = augmentation()
    keys = augment.sample_keys(5, 0, torch.arange(N))
    u = augment.stream_uniforms(keys, augment.SLOTS_PER_VIEW, (0, 1))
    both = augment.sample_view_params(u, aug)
    p1 = augment.ViewParams(*(t[:N] for t in both))
    p2 = augment.ViewParams(*(t[N:] for t in both))

    def rate_ok(flags, p):
        return (
            stats.binomtest(int(flags.sum()), len(flags), p).pvalue > 1e-3
            if 0 < p < 1
            else bool((flags == (p == 1)).all())
        )

    assert rate_ok(p1.flip, 0.5) and rate_ok(p1.gray, 0.2)
    assert rate_ok(p1.blur_sigma > 0, 1.0) and rate_ok(p2.blur_sigma > 0, 0.1)
    assert rate_ok(p1.solarize, 0.0) and rate_ok(p2.solarize, 0.2)
    jittered = (p1.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1)
    assert rate_ok(jittered, 0.8)
    j = p1.jitter[jittered]
    for column, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert stats.kstest(j[:, column].numpy(), "uniform", args=(lo, hi - lo)).pvalue > 1e-3
    sigma = p1.blur_sigma.numpy()
    assert stats.kstest(sigma, "uniform", args=(0.1, 1.9)).pvalue > 1e-3
    # All 24 orders of the four jitter operations occur about equally often.
    orders, counts = np.unique(p1.jitter_order.numpy(), axis=0, return_counts=True)
    assert len(orders) == 24 and stats.chisquare(counts).pvalue > 1e-3


def test_pixel_operations_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 20)
    torch.testing.assert_close(augment.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    shifts = torch.linspace(-0.5, 0.5, 6)
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(augment.adjust_hue(x, shifts), expected, atol=2e-5, rtol=0)
    for op, fn in ((0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)):
        factor = 1.3
        jitter = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(6, 1)
        jitter[:, op] = factor
        order = torch.tensor([op] + [o for o in range(4) if o != op]).repeat(6, 1)
        expected = torch.stack([fn(x[i], factor) for i in range(6)])
        torch.testing.assert_close(
            augment.color_jitter(x, jitter, order), expected, atol=1e-5, rtol=0
        )
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.1, 0.0])
    blurred = augment.gaussian_blur(x, sigma, 5)
    for i in range(5):
        torch.testing.assert_close(
            blurred[i], TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(blurred[5], x[5])  # sigma 0: unchanged


def test_a_samples_views_do_not_depend_on_its_batch():
    """Why 1 and 2 slots, loader and device augmentation, resumed and fresh runs see the same
    views: each sample's randomness comes from its own key."""
    aug = augmentation()
    transform = augment.TwoViewAugmentation(aug, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    keys = augment.sample_keys(0, 4, torch.arange(8))
    whole = transform(images, keys)
    half = transform(images[4:], keys[4:])
    torch.testing.assert_close(whole[4:8], half[:4])  # view 1 of samples 4..7
    torch.testing.assert_close(whole[12:16], half[4:])  # view 2
    assert whole.shape == (16, 3, 32, 32)
    assert not torch.allclose(whole[:8], whole[8:])  # the two views differ


def test_large_images_are_cropped_in_the_loader_and_finished_in_batch():
    from PIL import Image

    aug = augmentation(image_size=24)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 60, 3), dtype=np.uint8)) for i in range(3)
    ]
    store = {f"c/{i}.png": None for i in range(3)}
    import io

    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        store[f"c/{i}.png"] = buf.getvalue()

    class Store:
        def read_many(self, names):
            return [store[n] for n in names]

    source = sources.FileSource(list(store), [0, 0, 0], ["c"], Store(), "mem")
    dataset = data.TrainImages(
        source,
        augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1)),
        seed=0,
        corrupt_log=data.CorruptImageLog(False),
    )
    items = dataset.__getitems__([(0, 0), (1, 0), (2, 0)])
    assert items[0]["image"].shape == (2, 3, 24, 24) and items[0]["image"].dtype == torch.uint8
    again = dataset.__getitems__([(2, 0)])
    assert torch.equal(again[0]["image"], items[2]["image"])  # deterministic per (index, epoch)
    batch = dataset.collate(items)
    views = augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))(batch["image"], batch["key"])
    assert views.shape == (6, 3, 24, 24) and torch.isfinite(views).all()


def test_an_augmentation_call_makes_no_tensor_from_host_values(monkeypatch):
    """On a GPU a tensor made from Python values is a host-to-device copy (and a sync): after
    its first call on a device, the augmentation makes none, for either input layout."""
    aug = _parse_augmentation(_Reader({"image_size": 16}, "augmentation"))
    transform = augment.TwoViewAugmentation(aug, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    keys = augment.sample_keys(0, 0, torch.arange(6))
    uncropped = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    cropped = torch.randint(0, 256, (6, 2, 3, 16, 16), dtype=torch.uint8)
    first = transform(uncropped, keys)  # copies the normalisation statistics once

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was made from host values")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse)
    assert torch.equal(transform(uncropped, keys), first)
    assert transform(cropped, keys).shape == (12, 3, 16, 16)


# The augmentation as it was before it was batched over both views (issue 19): its pixels are
# what runs, resumes and checkpoints so far were trained on.
BEFORE_BATCHED_VIEWS = "87fac6f3a7943cb97723a8a111e4c0ae4afdd29e"


@pytest.fixture(scope="module")
def previous_augment():
    fetch_commit_if_missing(ROOT, BEFORE_BATCHED_VIEWS)
    source = subprocess.run(
        ["git", "-C", ROOT, "show", f"{BEFORE_BATCHED_VIEWS}:augment.py"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=True,
    ).stdout
    # Its one import of this package: the config's types, in config.py since.
    source = source.replace("from utils import Augmentation", "from config import Augmentation")
    module = types.ModuleType("previous_augment")
    exec(compile(source, "previous_augment.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize(
    "shape",
    [(64, 3, 32, 32), (64, 3, 40, 56), (64, 2, 3, 32, 32), (64, 2, 3, 48, 48)],
    ids=["cifar-arrays", "uncropped-rectangles", "loader-crops", "loader-crops-resized"],
)
def test_two_views_give_the_previous_implementations_pixels(previous_augment, shape):
    """Same keys, same pixels: determinism, resume and old checkpoints are unchanged."""
    aug = augmentation()
    stats_ = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    ours = augment.TwoViewAugmentation(aug, *stats_)
    before = previous_augment.TwoViewAugmentation(aug, *stats_)
    images = torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    for seed, epoch in ((0, 0), (7, 3), (123, 11)):
        keys = augment.sample_keys(seed, epoch, torch.arange(shape[0]))
        torch.testing.assert_close(ours(images, keys), before(images, keys), atol=1e-5, rtol=0)


def test_crop_boxes_give_the_previous_implementations_boxes(previous_augment):
    """Including torchvision's fallback (no attempt fits) for too tall and too wide images."""
    keys = augment.sample_keys(2, 0, torch.arange(600))
    u = augment.uniforms(keys, 4 * augment.CROP_ATTEMPTS, stream=0)
    heights = torch.tensor([32, 10, 200, 480, 37, 5] * 100)
    widths = torch.tensor([32, 200, 10, 640, 23, 7] * 100)
    for scale in ((0.08, 1.0), (0.95, 1.0)):
        ours = augment.sample_crop_boxes(u, heights, widths, scale, (3 / 4, 4 / 3))
        before = previous_augment.sample_crop_boxes(u, heights, widths, scale, (3 / 4, 4 / 3))
        assert torch.equal(ours, before)


@pytest.mark.parametrize(
    "shape,size",
    [((512, 3, 32, 32), 32), ((128, 2, 3, 224, 224), 224)],
    ids=["512-cifar-arrays", "128-imagenet-loader-crops"],
)
def test_an_augmentation_call_launches_at_most_300_kernels_and_never_syncs(shape, size):
    """Counted on `meta`, which takes CUDA's branches: every non-view op is a kernel launch
    on a GPU (the previous implementation launched 985 and 773)."""
    aug = augmentation(image_size=size)
    transform = augment.TwoViewAugmentation(aug, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = torch.empty(shape, dtype=torch.uint8, device="meta")
    keys = augment.sample_keys(0, 0, torch.arange(shape[0])).to("meta")
    transform(images, keys)  # the first call copies the constants to the device
    with OpCounter() as counter:
        views = transform(images, keys)
    assert views.shape == (2 * shape[0], 3, size, size)
    assert counter.launches() <= 300, counter.summary()
    assert counter.syncs() == 0, counter.sync_names()


def test_the_augmentation_compiles_as_one_graph_with_the_eager_pixels():
    """What compile: auto runs on a GPU (inductor, one graph: no break, no host sync), here
    on a CPU and small, as compiling takes minutes on two cores."""
    aug = augmentation(image_size=16)
    transform = augment.TwoViewAugmentation(aug, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    keys = augment.sample_keys(0, 0, torch.arange(4))
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    eager = transform(images, keys)
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = torch.compile(transform, fullgraph=True)(images, keys)
    print(f"compile + first call: {time.perf_counter() - start:.0f} s")
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


CIFAR_SUBSET = pathlib.Path(ROOT).parent / "shared" / "data" / "cifar10-subset"


def inside_the_crop(crop_size: int, size: int) -> torch.Tensor:
    """[size] bool: output pixels whose bilinear source point, (j + 0.5) * crop / size - 0.5 in
    the crop's pixel coordinates, lies between the crop's first and last pixel centres."""
    source = (torch.arange(size, dtype=torch.float64) + 0.5) * crop_size / size - 0.5
    return (source >= 0) & (source <= crop_size - 1)


@pytest.mark.skipif(not CIFAR_SUBSET.is_dir(), reason=f"needs real images in {CIFAR_SUBSET}")
def test_crops_of_real_images_equal_torchvision_resized_crop():
    """CIFAR-10 training crops (32 px out of crops of at most 32 px: upsampling) are
    torchvision's resized_crop of the sampled box, wherever a bilinear sample lies inside the
    crop. At the outermost output pixels of an enlarged crop roi_align blends in the image
    pixel just outside the box, where resized_crop, having cut the box out first, repeats the
    box's edge pixel."""
    files = sorted(CIFAR_SUBSET.glob("test/*/*.png"))[:200]
    images = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()) for f in files]
    ).permute(0, 3, 1, 2)
    n, size = len(images), 32
    planner = augment.TwoViewAugmentation(augmentation(), (0, 0, 0), (1, 1, 1))
    side = torch.full((n,), 32)
    boxes = planner.crop_boxes(augment.sample_keys(7, 0, torch.arange(n)), 0, side, side)
    crops = augment.crop_resize_batch(images, boxes, size)
    compared = 0
    for image, crop, (x0, y0, x1, y1) in zip(images, crops, boxes.int().tolist()):
        expected = TF.resized_crop(
            image.float(), y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True
        )
        rows, columns = inside_the_crop(y1 - y0, size), inside_the_crop(x1 - x0, size)
        torch.testing.assert_close(
            crop[:, rows][:, :, columns], expected[:, rows][:, :, columns], atol=1e-3, rtol=0
        )
        compared += int(rows.sum()) * int(columns.sum())
    assert compared > 0.85 * n * size * size  # the edge rows and columns aside (88% here)


TORCHVISION_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
            ],
        ),
    ],
)
def test_color_jitter_applies_each_samples_own_order_with_hue_as_torchvision(device):
    """All 24 orders of brightness, contrast, saturation and hue, one per image, every factor
    away from the identity: torchvision's four functional ops applied in that image's order.
    color_jitter takes one path on every device (no branch on the device type)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 20, 20, generator=generator)
    order = torch.tensor(list(itertools.permutations(range(4))))
    low = torch.tensor([0.6, 0.6, 0.8, -0.1])  # the recipe's ranges (const-cifar10.yaml)
    jitter = low + (torch.tensor([1.4, 1.4, 1.2, 0.1]) - low) * torch.rand(
        24, 4, generator=generator
    )
    jitter[:, 3] = torch.where(jitter[:, 3].abs() < 0.02, 0.05, jitter[:, 3])  # hue always on
    out = augment.color_jitter(x.to(device), jitter.to(device), order.to(device)).cpu()
    for i in range(24):
        expected = x[i]
        for op in order[i].tolist():
            expected = TORCHVISION_JITTER[op](expected, float(jitter[i, op]))
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_view_pixels_are_torchvisions_ops_in_the_recipe_order():
    """pixel_ops with the sampled parameters of each image: flip, colour jitter (its own order),
    grayscale, Gaussian blur, solarize, normalisation, each torchvision's functional op, in
    that order, for both views (one batch of 2B). View 2 with solarize_prob 0.5 so every op is
    both on and off in its half."""
    aug = augmentation(
        image_size=20, view2={"blur_prob": 0.5, "solarize_prob": 0.5}, grayscale_prob=0.3
    )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = augment.TwoViewAugmentation(aug, mean, std)
    n = 64
    keys = augment.sample_keys(11, 0, torch.arange(n))
    x = torch.rand(2 * n, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    u = augment.stream_uniforms(keys, augment.SLOTS_PER_VIEW, (0, 1))  # [2 views, n, slots]
    out = transform.pixel_ops(x, u)
    p = augment.sample_view_params(u, aug)
    jittered = (p.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1)
    for flags in (p.flip, jittered, p.gray, p.blur_sigma > 0, p.solarize):
        assert 0 < int(flags[n:].sum()) < n  # view 2
    kernel = transform.blur_kernel_size
    for i in range(2 * n):
        y = TF.hflip(x[i]) if p.flip[i] else x[i]
        for op in p.jitter_order[i].tolist():
            y = TORCHVISION_JITTER[op](y, float(p.jitter[i, op]))
        if p.gray[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if p.blur_sigma[i] > 0:
            y = TF.gaussian_blur(y, [kernel, kernel], [float(p.blur_sigma[i])] * 2)
        if p.solarize[i]:
            y = TF.solarize(y, 0.5)
        # 1e-5 in pixel values [0, 1], as normalised: divided by the std.
        torch.testing.assert_close(out[i], TF.normalize(y, mean, std), atol=1e-5 / 0.2, rtol=0)


# Each shipped config's augmentation, read from the config itself, and the images its data has:
# CIFAR-10 32 x 32, STL-10 96 x 96, ImageNet's typical 375 x 500 (the loader crops those).
SHIPPED = {
    "const-cifar10.yaml": (32, 32),
    "distributed-stl10.yaml": (96, 96),
    "distributed-imagenet.yaml": (375, 500),
}
# The blur kernel the BYOL paper specifies (Appendix B: 23 x 23 at 224 px, 10% of the side,
# following SimCLR, whose data_util.random_blur takes height // 10 and makes it odd as
# 2 * (k // 2) + 1), at each shipped image size.
PAPER_BLUR_KERNEL = {32: 3, 96: 9, 224: 23}


def shipped_augmentation(name):
    import yaml

    with open(pathlib.Path(ROOT) / name) as f:
        raw = yaml.safe_load(f)["hyperparameters"]["augmentation"]
    return _parse_augmentation(_Reader(raw, "augmentation"))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_size_dependent_parameters_are_the_papers_and_torchvisions_at_each_shipped_size(name):
    """At the config's own image size: the blur kernel is the paper's, and the blur it applies
    is torchvision's GaussianBlur with that kernel (sigma over the recipe's range, both
    views' probabilities); crop boxes on the data's own image size follow torchvision's
    RandomResizedCrop with the config's scale; views come out image_size square, as
    RandomResizedCrop(image_size) makes them."""
    aug = shipped_augmentation(name)
    size = aug.image_size
    height, width = SHIPPED[name]
    planner = augment.TwoViewAugmentation(aug, (0, 0, 0), (1, 1, 1))
    kernel = PAPER_BLUR_KERNEL[size]
    assert planner.blur_kernel_size == kernel

    generator = torch.Generator().manual_seed(size)
    x = torch.rand(4, 3, size, size, generator=generator)
    sigma = torch.tensor([aug.blur_sigma[0], 0.7, 1.3, aug.blur_sigma[1]])
    blurred = augment.gaussian_blur(x, sigma, planner.blur_kernel_size)
    for i in range(4):
        expected = transforms.GaussianBlur(kernel, sigma=float(sigma[i]))(x[i])
        torch.testing.assert_close(blurred[i], expected, atol=1e-5, rtol=0)

    keys = augment.sample_keys(13, 0, torch.arange(N))
    boxes = planner.crop_boxes(keys, 1, torch.full((N,), height), torch.full((N,), width))
    boxes = boxes.numpy()
    ours_w, ours_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    torch.manual_seed(size)
    image = torch.zeros(3, height, width)
    crop = transforms.RandomResizedCrop(size, scale=tuple(aug.crop_scale))
    theirs = np.array([crop.get_params(image, crop.scale, crop.ratio) for _ in range(N)])
    their_area = theirs[:, 2] * theirs[:, 3] / (height * width)
    assert stats.ks_2samp(ours_w * ours_h / (height * width), their_area).pvalue > 1e-3
    assert stats.ks_2samp(ours_w / ours_h, theirs[:, 3] / theirs[:, 2]).pvalue > 1e-3

    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=generator)
    views = planner(images, augment.sample_keys(13, 0, torch.arange(2)))
    assert views.shape[-2:] == crop(images[0]).shape[-2:] == (size, size)
