"""The training process's half of data.decode_on: gpu: the JPEG bytes the loader workers read,
decoded on the training device in one batched call (torchvision.io.decode_jpeg: nvJPEG on a
GPU) and cut into both views' crops there.

The crop boxes are the loader's (data.TrainImages.view_boxes: the same function of seed, epoch,
index, view and the size in the header as when the loader decodes), and the crops are cut and
resized as the loader cuts them (images.crop_resize), on the device. What differs from the
loader's crops is the decoder: nvJPEG's IDCT against libjpeg-turbo's, and the loader's reduced
DCT decode of large JPEGs (images.REDUCED_DECODE_MIN_PIXELS), which this path does not use.

A JPEG the device cannot decode is decoded as the loader would (images.EncodedImage.crops, on
the CPU); one that cannot be decoded at all is logged as the loader logs a corrupt image
(data.CorruptImageLog), counted in corrupt_images, and its row takes the crops of another image
of the batch (the loader takes the next image of the set instead, which is not here).
"""

from typing import Callable, List, Optional

import torch

from config import ConfigError
from images import CorruptImageError, EncodedImage, crop_resize, crops_or_error, decode_jpeg

try:
    from torchvision.io import ImageReadMode
except ImportError:  # no torchvision decoders: data.decodes_on_device never chooses this path
    ImageReadMode = None


def decode_all(blobs: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """uint8 [3, H, W] images on `device` (None where the decoder refused one): one batched
    call, or one call per image where that fails (a bad image fails the whole batch; a
    torchvision before 0.19 takes no list)."""
    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, TypeError):
        pass
    decoded: List[Optional[torch.Tensor]] = []
    for blob in blobs:
        try:
            decoded.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(None)
    return decoded


def crops(
    batch, size: int, device: torch.device, location: Callable[[int], str], corrupt_log
) -> torch.Tensor:
    """uint8 [B, 2, 3, size, size] on `device`: the loader's crops where it decoded (rows
    image_rows), both views of each JPEG decoded here (rows jpeg_rows). `location(index)` names
    an image of the training source for the corrupt-image log (sources: location)."""
    out = torch.empty(len(batch["key"]), 2, 3, size, size, dtype=torch.uint8, device=device)
    out[batch["image_rows"]] = batch["image"]
    blobs = list(torch.split(batch["jpeg"], batch["jpeg_sizes"].tolist()))
    rows, boxes = batch["jpeg_rows"].tolist(), batch["jpeg_boxes"]
    refused = []
    for j, (image, row) in enumerate(zip(decode_all(blobs, device), rows)):
        if image is None:
            refused.append(j)
        else:
            out[row] = crop_resize(image, boxes[j], size)
    good = [row for row in range(len(out)) if row not in {rows[j] for j in refused}]
    for j in refused:
        row, index = rows[j], int(batch["jpeg_index"][j])
        image = EncodedImage(blobs[j].numpy().tobytes(), location(index))
        views = crops_or_error(image, boxes[j], size)
        if not isinstance(views, CorruptImageError):
            out[row] = views.to(device)
            continue
        corrupt_log.report(views)
        if not good:
            raise ConfigError("every image of a training batch is corrupt")
        out[row] = out[good[0]]
        batch["corrupt"][row] = 1
    return out
