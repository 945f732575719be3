"""Decoding an image file's bytes, and the error a corrupt one raises: shared by the image
sources of data.py and the shard reader of shards.py."""

import io
from typing import Optional

from PIL import Image, UnidentifiedImageError


class CorruptImageError(ValueError):
    """An image that cannot be read. In a loader worker, strict mode raises it; PyTorch re-raises
    it in the training process as CorruptImageError(the worker's whole traceback), whose last
    line is the original message: `one_line` gives that."""

    def __init__(self, name: str, reason: Optional[str] = None):
        super().__init__(name if reason is None else f"{name}: not a decodable image ({reason})")
        self.name = name

    @property
    def one_line(self) -> str:
        last = str(self).strip().splitlines()[-1]
        return last.split("CorruptImageError: ", 1)[-1]


def decode_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).split(" <")[0]  # drop PIL's "<_io.BytesIO object at 0x...>"
        raise CorruptImageError(name, reason) from None
