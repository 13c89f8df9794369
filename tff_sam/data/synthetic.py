"""The embedded default dataset: deterministic synthetic shapes on textured backgrounds.

Used when no `--data_dir` is given, so the main job and the tests run anywhere with
no downloads. Three sites with different looks (background texture, brightness,
object colours and sizes) make the clients genuinely non-IID; a `test/` folder
holds images drawn from all sites. Images are 8-bit RGB PNGs, masks 16-bit instance
label PNGs. Generation is deterministic given the seed and writes atomically.
"""

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from tff_sam import fileio

VERSION = 1

# Per-site look: (background base RGB, texture kind, object RGB, contrast, size range).
_SITES = (
    ((200, 190, 170), "gradient", (60, 40, 30), 1.0, (0.10, 0.22)),
    ((40, 45, 60), "noise", (220, 210, 120), 0.8, (0.08, 0.16)),
    ((120, 150, 120), "stripes", (250, 80, 80), 0.6, (0.12, 0.25)),
)


def _background(rng: np.random.Generator, h: int, w: int, base, kind: str) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.empty((h, w, 3), np.float32)
  img[:] = np.asarray(base, np.float32)
  if kind == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) * 40.0
    img += ramp[..., None]
  elif kind == "stripes":
    period = rng.uniform(8, 16)
    img += (20.0 * np.sin(2 * np.pi * (xx + yy) / period))[..., None]
  img += rng.normal(0, 12.0 if kind == "noise" else 5.0, size=(h, w, 1)).astype(np.float32)
  return img


def _shape_mask(rng: np.random.Generator, h: int, w: int, size_range) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w]
  s = rng.uniform(*size_range) * min(h, w)
  cy, cx = rng.uniform(s, h - s), rng.uniform(s, w - s)
  kind = rng.integers(3)
  if kind == 0:  # Ellipse.
    ry, rx = s * rng.uniform(0.6, 1.0), s * rng.uniform(0.6, 1.0)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
  if kind == 1:  # Axis-aligned rectangle.
    ry, rx = s * rng.uniform(0.5, 1.0), s * rng.uniform(0.5, 1.0)
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
  # Triangle: half-planes of three vertices around the centre.
  angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
  vy, vx = cy + s * np.sin(angles), cx + s * np.cos(angles)
  inside = np.ones((h, w), bool)
  for i in range(3):
    j = (i + 1) % 3
    cross = (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
    inside &= cross >= 0
  return inside


def render_example(rng: np.random.Generator, *, site: int, height: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Draws one image of a site and its instance labels.

  Args:
    rng: Source of randomness.
    site: Site index (selects the look).
    height: Image height.
    width: Image width.

  Returns:
    (uint8 RGB image, uint16 instance labels); later shapes occlude earlier ones and
    every label present has at least 16 pixels.
  """
  base, kind, colour, contrast, size_range = _SITES[site % len(_SITES)]
  img = _background(rng, height, width, base, kind)
  labels = np.zeros((height, width), np.uint16)
  for obj in range(int(rng.integers(2, 5))):
    m = _shape_mask(rng, height, width, size_range)
    shade = np.asarray(colour, np.float32) * rng.uniform(0.85, 1.15)
    img[m] = contrast * shade + (1 - contrast) * img[m]
    labels[m] = obj + 1
  img += rng.normal(0, 3.0, size=img.shape).astype(np.float32)
  for value in np.unique(labels):
    if value and (labels == value).sum() < 16:
      labels[labels == value] = 0
  return np.clip(img, 0, 255).astype(np.uint8), labels


def generate(root: Path, *, images_per_site: int = 8, test_per_site: int = 2,
             height: int = 96, width: int = 128, seed: int = 0) -> Path:
  """Writes the synthetic dataset to `root` (replacing any previous content).

  Args:
    root: Destination folder; becomes `site_0..2/{images,masks}` and `test/...`.
    images_per_site: Training images per site.
    test_per_site: Held-out images per site, all in `test/`.
    height: Image height in pixels.
    width: Image width in pixels.
    seed: Makes the dataset deterministic.

  Returns:
    `root`.
  """
  root = Path(root)
  with fileio.atomic_directory(root) as tmp:
    for site in range(len(_SITES)):
      rng = np.random.default_rng([seed, site])
      for i in range(images_per_site + test_per_site):
        image, labels = render_example(rng, site=site, height=height, width=width)
        folder = tmp / (f"site_{site}" if i < images_per_site else "test")
        stem = f"site{site}_{i:03d}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "images" / f"{stem}.png"), image[..., ::-1])
        cv2.imwrite(str(folder / "masks" / f"{stem}.png"), labels)
    (tmp / "README.txt").write_text(
        f"tff_sam synthetic dataset v{VERSION} (seed {seed}): {len(_SITES)} sites x "
        f"{images_per_site} training images, {test_per_site} test images per site in test/.\n")
  return root


def default_dataset(cache_dir: Optional[Path] = None, *, seed: int = 0) -> Path:
  """Returns the embedded default dataset, generating it on first use."""
  root = (Path(cache_dir) if cache_dir else fileio.default_cache_dir()) / "data" / (
      f"synthetic-v{VERSION}-seed{seed}")
  if not (root / "README.txt").exists():
    generate(root, seed=seed)
  return root
