"""uint8 pixels to floats, shared by the image, CIFAR-10 and uint8 array readers (scales: ``IMAGE_SCALES``)."""

from __future__ import annotations

import numpy as np
import torch

_SCALE_RULE = {"[-1,1]": "x / 127.5 - 1", "[0,1]": "x / 255", "[0,255]": "x (as float)"}


def _scale_images(u8: np.ndarray, scale: str) -> torch.Tensor:
    x = torch.from_numpy(u8).to(torch.float32)
    if scale == "[-1,1]":
        x.div_(127.5).sub_(1.0)
    elif scale == "[0,1]":
        x.div_(255.0)
    return x


def _scale_note(scale: str, what: str = "uint8") -> str:
    return f"dtype: {what} scaled {_SCALE_RULE[scale]} to {scale}"
