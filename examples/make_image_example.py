"""Writes a small image-folder training set and a guided-diffusion / ADM style sample archive for `diffgen-fast score`.

    python examples/make_image_example.py [OUT_DIR]

OUT_DIR/digits_png/   the 1,797 8x8 digits of scikit-learn as grayscale PNGs (digit_0000.png, ...)
OUT_DIR/samples.npz   arr_0: uint8 [64, 8, 8, 1] (channels last, as ADM's sampler saves them): 16 exact copies of
                      training digits (rows 0-15: digit_0100.png, digit_0200.png, ...) and 48 blends of two digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: Path) -> None:
    digits = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8] in 0..255
    folder = out / "digits_png"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(digits):
        Image.fromarray(img, mode="L").save(folder / f"digit_{i:04d}.png")
    rng = np.random.default_rng(0)
    copies = digits[100 * np.arange(1, 17)]  # digit_0100.png, digit_0200.png, ..., digit_1600.png
    a, b = rng.integers(0, len(digits), size=(2, 48))
    blends = ((digits[a].astype(np.float64) + digits[b]) / 2).round().astype(np.uint8)
    samples = np.concatenate([copies, blends])[..., None]  # [64, 8, 8, 1] uint8, channels last
    np.savez(out / "samples.npz", arr_0=samples)
    print(f"wrote {folder}/ ({len(digits)} PNGs) and {out / 'samples.npz'} (uint8 {list(samples.shape)})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
