"""Write data/digits: scikit-learn's bundled handwritten digits as 28x28 PNGs, prepared by `fmdist prepare`.

The 1,797 8x8 images (values 0-16) of `sklearn.datasets.load_digits` are scaled to 0-255, upscaled
to 28x28 grayscale with bicubic interpolation, written as a temporary image folder (class folders
"0".."9", files named by their index in the data set) and prepared with eval_fraction=0.2, seed=0,
256 rows per shard. The output is the same bytes on every run (PNGs carry no timestamp); only the
manifests' `created` differs.

Needs scikit-learn, which fmdist does not depend on (`pip install scikit-learn`). Run from the
repository root:

    python scripts/make_digits.py            # writes data/digits/train and data/digits/eval
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sklearn
from PIL import Image
from sklearn.datasets import load_digits

from fmdist.data.prepare import prepare
from fmdist.data.sources import MANIFEST

SIZE = 28


def write_image_folder(root: Path) -> int:
    """One PNG per digit under root/<label>/<index>.png; returns how many were written."""
    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        gray = np.rint(pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(gray).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        path = root / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    return len(digits.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent.parent / "data" / "digits"))
    args = parser.parse_args()
    output = Path(args.output)
    for split in ("train", "eval"):
        # A re-run must not leave shards of an earlier run beside the new ones.
        shutil.rmtree(output / split, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        count = write_image_folder(Path(tmp))
        manifests = prepare([tmp], str(output), eval_fraction=0.2, seed=0, rows_per_shard=256)
    for split, manifest in manifests.items():
        # The temporary folder is gone; record where the images really came from.
        manifest["sources"] = [f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}), upscaled to 28x28"]
        (output / split / MANIFEST).write_text(json.dumps(manifest, indent=2))
    rows = {split: m["total_rows"] for split, m in manifests.items()}
    print(f"{count} digits -> {output}: {rows}, label_names {manifests['train']['label_names']}")


if __name__ == "__main__":
    main()
