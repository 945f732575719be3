"""What `slots` training processes compute, in this one process: each slot's share of every
global batch through its own forward pass (its own BatchNorm batch statistics), the slots'
gradients averaged (what DistributedDataParallel's all-reduce does), one LARS step, one EMA
step. The multi-process and cluster tests compare real runs against it."""

from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

import augment
import byol
import data
import optim
from backbone import build_backbone
from config import parse_data_config, parse_hparams

# Largest |weight - reference| allowed after the 6 steps of the tiny config. Two processes
# cannot equal a one-process run: BatchNorm normalises each slot's share of the batch on its
# own (step 1's loss is 4.336 with 2 slots of 4 images, 4.198 with 1 slot of 8). They can equal
# this reference, which does the same float operations: the slots' forward passes as the
# processes run them (one thread each), and DDP's all-reduce of two gradients, a sum of two
# (commutative: no order to differ in) halved (exact in binary), against autograd's sum of
# the two halves. Measured: 0.0 for 1 and 2 slots. Not 0: 1e-6 admits a last-bit difference in
# the final step only; one in an early step is amplified through the steps (another thread
# count, i.e. another summation order in the convolutions, ends 4e-3 apart), so nothing looser
# is justified, and a real difference (unaveraged gradients, a slot given other images) moves
# weights by up to 0.28 over these steps.
TOLERANCE = 1e-6


def reference_training(
    hyperparameters: Dict[str, Any], folder: Path, slots: int, steps: int, seed: int = 0
) -> Tuple[List[float], Dict[str, torch.Tensor]]:
    """(the loss of each global step, every online and target parameter after `steps` steps)
    of training on `folder`'s images (tests/conftest.write_image_folder) with `seed` as the
    run's seed (the local command's reproducibility.experiment_seed, a cluster trial's seed)."""
    # One thread, as the tests' training processes run (OMP_NUM_THREADS=1): with more, the
    # convolutions sum in another order, and 6 steps amplify that rounding to ~4e-3 (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(hyperparameters, folder, slots, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(hyperparameters, folder, slots, steps, seed):
    hp = parse_hparams(hyperparameters, slots)
    splits = data.build_splits(
        "image_folder",
        parse_data_config({"train_dir": str(folder / "train"), "test_dir": str(folder / "test")}),
    )
    torch.manual_seed(seed)  # as the trial's process is seeded before it builds the network
    backbone, dim = build_backbone(hp.backbone_name, hp.cifar_stem, hp.augmentation.image_size)
    network = byol.BYOLNetwork(backbone, dim, hp.projector_hidden_dim, hp.projection_dim).train()
    optimizer = optim.LARS(
        optim.parameter_groups(network, hp.weight_decay),
        lr=0.0,
        momentum=hp.lars_momentum,
        trust_coefficient=hp.lars_trust_coefficient,
    )
    augmentation = augment.TwoViewAugmentation(hp.augmentation, *splits.normalization)
    dataset = data.TrainImages(
        splits.byol_train, augmentation, seed, data.CorruptImageLog(False), augment_in_loader=True
    )
    sampler = data.EpochBatchSampler(len(splits.byol_train), hp.global_batch_size, slots, seed)
    total = hp.epochs * sampler.batches_per_epoch
    warmup = round(hp.warmup_epochs * sampler.batches_per_epoch)
    per_slot_batches: List = []
    while len(per_slot_batches) < steps * slots:
        per_slot_batches += list(sampler)  # each pass is the next epoch
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = optim.learning_rate_at(step, total, warmup, hp.peak_learning_rate)
        optimizer.zero_grad()
        slot_losses = []
        for batch in per_slot_batches[step * slots : (step + 1) * slots]:
            views = dataset.collate(dataset.__getitems__(batch))["views"]
            prediction, target_projection, _ = network(views)
            loss = byol.byol_loss(prediction, target_projection)
            (loss / slots).backward()  # the mean of the slots' gradients
            slot_losses.append(float(loss.detach()))
        losses.append(sum(slot_losses) / slots)
        optimizer.step()
        network.update_target(optim.ema_tau_at(step, total, hp.tau_base))
    return losses, {name: p.detach().clone() for name, p in network.named_parameters()}


def largest_parameter_difference(state: Dict[str, torch.Tensor], reference) -> float:
    """Max |a - b| over the reference's parameters, found in a checkpoint's model state dict
    (whose keys a multi-slot run may prefix with DistributedDataParallel's "module.")."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return max(float((state[n].double() - p.double()).abs().max()) for n, p in reference.items())
