"""Where does a BYOL step's time go? Ratios measured in one run, on this machine.

    python benchmarks/speed.py [--device cpu|cuda] [--byol-pytorch DIR] [--repeats 7]

0. What makes a GPU wait, counted on the chosen device: aten ops (each non-view op is one kernel
   launch on a GPU) and host syncs of one training step (train_batch with the augmentation on
   the device), split into the augmentation, the network (forward + backward) and the
   optimizer + EMA (with the non-finite guard).

1. Our training step (BYOLTrial.train_batch: both views in one forward, LARS, fused EMA, the
   non-finite guard, metrics) vs the bare compute, as a careful user would write the loop: the
   same networks on both views in one forward each (as byol-pytorch does), the same LARS step,
   and the EMA as one fused multi-tensor op (torch._foreach_lerp_, as torch.optim.swa_utils
   does); nothing else.
2. Ours vs byol-pytorch 0.9.1 on the same backbone and batch (its own BYOL module, augmentation
   replaced by the identity so only the network step is timed). byol-pytorch is not a dependency:
   `pip install --no-deps --target DIR byol-pytorch==0.9.1 einops beartype` and pass --byol-pytorch DIR.
3. Two-view augmentation throughput on one CPU thread (the loader's case, whatever --device),
   32-px images: ours (batched, per-sample parameters) vs torchvision's per-image PIL pipeline
   with the same recipe (and kornia's batched ops with the same recipe, if kornia is installed).
4. Validation cost: backbone forward passes per labeled image and wall time of a validation in
   units of one forward pass over the labeled images.
Timings interleave the contenders (A B A B ...) and report medians, so drift of a shared machine
hits both alike.
"""

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import augment  # noqa: E402
import byol  # noqa: E402
import device  # noqa: E402
import optim  # noqa: E402
import utils  # noqa: E402
from backbone import build_backbone  # noqa: E402
from benchmarks.op_count import OpCounter  # noqa: E402
from config import load_config, parse_experiment_config  # noqa: E402

BATCH = 64
IMAGE = 32


def interleaved(contenders, repeats, warmup=2, sync=lambda: None):
    """{name: median seconds} of each zero-argument callable, run in turn `repeats` times;
    `sync` waits for the device before a clock is read."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report_ratio(rows, label, printed, value, digits, goal=None):
    """One ratio: a line of the report (with its goal) and a row of the summary table."""
    print(f"   {printed:27s} = {value:.{digits}f}x" + (f"  (goal {goal})" if goal else ""))
    rows.append([label, f"{value:.{digits}f}x"])


def use_device(parser, name):
    """(on a GPU, the wait for the device before a clock is read) for `--device name`; a GPU
    that torch does not see is the parser's error, and on the CPU Determined's context is kept
    from taking a GPU it sees."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here; use --device cpu")
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    on_gpu = name == "cuda"
    return on_gpu, (torch.cuda.synchronize if on_gpu else lambda: None)


@contextlib.contextmanager
def local_trial(config_path, overrides):
    """A real BYOLTrial built by Determined's local context from a config yaml + overrides (the
    device is the context's: a GPU when torch sees one)."""
    from determined import pytorch

    import model_def

    config = load_config(config_path, overrides)
    with pytorch.init(hparams=config["hyperparameters"], exp_conf=config) as context:
        torch.manual_seed(0)
        yield model_def.BYOLTrial(context, parse_experiment_config(config))


STEP_PARTS = (  # (part, owner attribute path under the trial, method)
    ("augmentation", "", "two_views"),
    ("network", "", "forward_loss"),
    ("network", "context", "backward"),
    ("optimizer + EMA", "non_finite", "screen"),
    ("optimizer + EMA", "optimizer", "step"),
    ("optimizer + EMA", "network", "update_target"),
)


def train_steps(trial, first=0):
    """train_batch at consecutive steps from `first`, as Determined's training loop calls it:
    a function of the batch."""
    step = [first]

    def train_step(batch):
        trial.context._current_batch_idx = step[0]  # what Determined's training loop sets
        trial.train_batch(batch, 0, step[0])
        step[0] += 1

    return train_step


def count_step(trial, batch, step):
    """An OpCounter of one trial.train_batch, its ops counted by STEP_PARTS; the rest (learning
    rate, metrics, progress) is counted as `other`."""
    counter = OpCounter()

    def in_part(part, fn):
        def counted(*args, **kwargs):
            with counter.section(part):
                return fn(*args, **kwargs)

        return counted

    with contextlib.ExitStack() as patches:
        for part, owner_path, name in STEP_PARTS:
            owner = trial
            for attribute in filter(None, owner_path.split(".")):
                owner = getattr(owner, attribute)
            patches.enter_context(
                mock.patch.object(owner, name, in_part(part, getattr(owner, name)))
            )
        trial.context._current_batch_idx = step  # what Determined's training loop sets
        with counter:
            trial.train_batch(batch, 0, step)
    return counter


def device_batch(count, size, seed=0):
    """A training batch as the loader ships it with augment_on: device (uint8 images, keys)."""
    images = torch.from_numpy(
        np.random.default_rng(seed).integers(0, 255, (count, 3, size, size), dtype=np.uint8)
    )
    return {
        "image": images,
        "key": augment.sample_keys(seed, 0, torch.arange(count)),
        "corrupt": torch.zeros(count, dtype=torch.long),
    }


def write_folder(root, per_class=64, classes=4, test_per_class=16):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            os.makedirs(f"{root}/{split}/c{c}", exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)).save(
                    f"{root}/{split}/c{c}/{i}.png"
                )


def bare_step_fn(trial):
    """The same networks and LARS, stepped the plain way, eager, in the trial's precision:
    both views in one forward per network, the EMA one fused multi-tensor op."""
    net = trial.network
    opt = optim.LARS(optim.parameter_groups(net, 1.5e-6), lr=0.1, momentum=0.9)
    online = net.online_parameters()
    target = net.target_parameters()

    def step(view1, view2):
        views = torch.cat([view1, view2])
        with device.autocast(trial.device, trial.autocast_dtype):
            p1, p2 = net.predictor(net.online_projector(net.online_backbone(views))).chunk(2)
            with torch.no_grad():
                z1, z2 = net.target_projector(net.target_backbone(views)).chunk(2)
        loss = (byol.regression_loss(p1, z2) + byol.regression_loss(p2, z1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(target, online, 0.01)

    return step


def load_byol_pytorch(path):
    """byol_pytorch/byol_pytorch.py from DIR, without its package __init__ (which needs
    `accelerate` for a trainer we do not use)."""
    sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(
        "byol_pytorch_module", os.path.join(path, "byol_pytorch", "byol_pytorch.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pil_pipeline(aug):
    from torchvision import transforms as T

    def view(spec):
        return T.Compose(
            [
                T.RandomResizedCrop(aug.image_size, scale=aug.crop_scale),
                T.RandomHorizontalFlip(aug.flip_prob),
                T.RandomApply(
                    [T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)],
                    p=aug.jitter_prob,
                ),
                T.RandomGrayscale(aug.grayscale_prob),
                T.RandomApply(
                    [T.GaussianBlur(augment.blur_kernel_size(aug.image_size), aug.blur_sigma)],
                    p=spec.blur_prob,
                ),
                T.RandomSolarize(128, p=spec.solarize_prob),
                T.ToTensor(),
                T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
            ]
        )

    v1, v2 = view(aug.view1), view(aug.view2)
    return lambda images: [
        torch.stack([v1(im) for im in images]),
        torch.stack([v2(im) for im in images]),
    ]


def kornia_pipeline(aug):
    import kornia.augmentation as K

    def view(spec):
        return torch.nn.Sequential(
            K.RandomResizedCrop((aug.image_size, aug.image_size), scale=aug.crop_scale),
            K.RandomHorizontalFlip(p=aug.flip_prob),
            K.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=aug.jitter_prob),
            K.RandomGrayscale(p=aug.grayscale_prob),
            K.RandomGaussianBlur(
                (
                    augment.blur_kernel_size(aug.image_size),
                    augment.blur_kernel_size(aug.image_size),
                ),
                aug.blur_sigma,
                p=spec.blur_prob,
            ),
            K.RandomSolarize(0.0, 0.0, p=spec.solarize_prob),
            K.Normalize(torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])),
        )

    v1, v2 = view(aug.view1), view(aug.view2)
    return lambda x: [v1(x), v2(x)]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--byol-pytorch", help="directory holding byol_pytorch/ 0.9.1 (and einops, beartype)"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the trial runs (default: cuda when torch sees a GPU)",
    )
    args = parser.parse_args()
    on_gpu, sync = use_device(parser, args.device)
    where = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    rows = []

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        write_folder(tmp)
        os.environ["XDG_DATA_HOME"] = os.path.join(tmp, "ckpt")
        overrides = [
            "hyperparameters.dataset_name=image_folder",
            f"data.train_dir={tmp}/train",
            f"data.test_dir={tmp}/test",
            f"hyperparameters.global_batch_size={BATCH}",
            "hyperparameters.cifar_stem=false",
            "data.num_workers=0",
            "hyperparameters.classifier_train_epochs=10",
            "hyperparameters.compile=false",  # eager: the ops counted are the ops launched
        ]
        trial = stack.enter_context(
            local_trial(os.path.join(ROOT, "const-cifar10.yaml"), overrides)
        )
        hp = trial.hp

        # 0. ops and host syncs per step (the second step: the first copies constants once)
        batch = device_batch(BATCH, IMAGE)
        for step in range(2):
            counter = count_step(trial, batch, step)
        print(
            f"\n0. one training step (train_batch, augmentation on the device), {args.device}: "
            f"ops and host syncs"
        )
        for part in ("augmentation", "network", "optimizer + EMA", "other"):
            print(f"   {part:20s} {counter.summary(part)}")
        print(f"   {'total':20s} {counter.summary()}  {counter.sync_names() or ''}")
        for part in ("augmentation", "network", "optimizer + EMA"):
            rows.append([f"kernel launches per step: {part}", str(counter.launches(part))])
        rows.append(["host syncs per step", str(counter.syncs())])

        torch.manual_seed(0)
        views = torch.randn(2 * BATCH, 3, IMAGE, IMAGE, device=trial.device)
        batch = {
            "views": views,
            "corrupt": torch.zeros(BATCH, dtype=torch.long),
            "key": torch.zeros(BATCH),
        }
        train_step = train_steps(trial, first=2)
        ours = lambda: train_step(batch)

        bare = bare_step_fn(trial)
        contenders = {"ours": ours, "bare": lambda: bare(views[:BATCH], views[BATCH:])}

        if args.byol_pytorch:
            bp = load_byol_pytorch(args.byol_pytorch)
            net, _ = build_backbone("resnet18", False, 224)
            net.fc = torch.nn.Linear(512, 10)  # byol-pytorch hooks the layer before fc
            learner = bp.BYOL(
                net,
                image_size=IMAGE,
                hidden_layer="avgpool",
                projection_size=256,
                projection_hidden_size=4096,
                augment_fn=torch.nn.Identity(),
                moving_average_decay=0.99,
                use_simplicial_embeddings=False,
            ).to(trial.device)
            bp_opt = optim.LARS(optim.parameter_groups(learner, 1.5e-6), lr=0.1, momentum=0.9)
            images = views[:BATCH]

            def byol_pytorch_step():
                loss = learner(images)
                bp_opt.zero_grad()
                loss.backward()
                bp_opt.step()
                learner.update_moving_average()

            contenders["byol-pytorch 0.9.1"] = byol_pytorch_step

        medians = interleaved(contenders, args.repeats, sync=sync)
        print(
            f"\n1-2. training step, ResNet-18 (ImageNet stem), batch {BATCH} x 2 views of "
            f"{IMAGE} px, {args.device} "
            f"(median of {args.repeats}, interleaved)"
        )
        for name, seconds in medians.items():
            print(f"   {name:20s} {seconds * 1000:8.1f} ms/step  {BATCH / seconds:7.1f} images/s")
        ratio = medians["ours"] / medians["bare"]
        report_ratio(rows, "ours / bare step time", "ours / bare time", ratio, 3, "<= 1.00x")
        if "byol-pytorch 0.9.1" in medians:
            speedup = medians["byol-pytorch 0.9.1"] / medians["ours"]
            label = "ours speed / byol-pytorch 0.9.1"
            report_ratio(rows, label, "ours speed vs byol-pytorch", speedup, 3, ">= 1.0x")

        # 3. augmentation throughput, one CPU thread (the loader's case)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        aug = hp.augmentation
        rng = np.random.default_rng(1)
        n = 256
        arrays = rng.integers(0, 255, (n, IMAGE, IMAGE, 3), dtype=np.uint8)
        pil_images = [Image.fromarray(a) for a in arrays]
        uint8 = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
        keys = augment.sample_keys(0, 0, torch.arange(n))
        ours_aug = augment.TwoViewAugmentation(aug, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
        pil = pil_pipeline(aug)
        aug_contenders = {
            "ours (batched)": lambda: ours_aug(uint8, keys),
            "PIL per image": lambda: pil(pil_images),
        }
        try:
            kornia_views = kornia_pipeline(aug)
            aug_contenders["kornia (batched)"] = lambda: kornia_views(uint8.float() / 255)
        except ImportError:
            pass
        aug_medians = interleaved(aug_contenders, max(3, args.repeats // 2), warmup=1)
        torch.set_num_threads(threads)
        print(f"\n3. two-view augmentation, 1 thread, {n} images of {IMAGE} px")
        for name, seconds in aug_medians.items():
            print(f"   {name:20s} {n / seconds:8.0f} images/s")
        ratio = aug_medians["PIL per image"] / aug_medians["ours (batched)"]
        label = "augmentation ours / PIL (1 thread, 32 px)"
        report_ratio(rows, label, "ours / PIL throughput", ratio, 2, ">= 4x")
        if "kornia (batched)" in aug_medians:
            k = aug_medians["kornia (batched)"] / aug_medians["ours (batched)"]
            report_ratio(rows, "augmentation ours / kornia", "ours / kornia throughput", k, 2)

        # 4. validation cost
        loader = trial.build_validation_data_loader()
        backbone = trial.network.online_backbone
        seen = [0]
        hook = backbone.register_forward_hook(
            lambda m, inp, out: seen.__setitem__(0, seen[0] + inp[0].shape[0])
        )
        trial.network.eval()
        labeled = len(loader.dataset)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            trial.probe.reset()
            for i, b in enumerate(loader):
                trial.evaluate_batch(b, i)
            sync()
            extract_s = time.perf_counter() - start
            trial.probe.cross_slot_reduce([trial.probe.per_slot_reduce()])
        sync()
        total_s = time.perf_counter() - start
        hook.remove()
        with torch.no_grad():
            start = time.perf_counter()
            for b in loader:
                backbone(trial.normalize(b["image"]))
            sync()
            one_pass_s = time.perf_counter() - start
        print(
            f"\n4. validation ({labeled} labeled + test images, {hp.probe.epochs} classifier epochs "
            f"on cached features, {len(hp.probe.lrs)} heads)"
        )
        print(f"   backbone forward passes per image: {seen[0] / labeled:.2f}")
        print(
            f"   validation wall time = {total_s / one_pass_s:.2f} forward passes over the images "
            f"(feature extraction {extract_s:.2f} s, heads + kNN {total_s - extract_s:.2f} s)"
        )
        rows.append(["validation, backbone passes per image", f"{seen[0] / labeled:.2f}"])
        rows.append(["validation time in forward-pass units", f"{total_s / one_pass_s:.2f}"])

    print("\nsummary")
    print(utils.format_table(rows, ["measure", "value"]))


if __name__ == "__main__":
    main()
