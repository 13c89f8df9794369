"""User-facing errors.

Every mistake a user can make (a bad flag, a missing file, an unreadable image, an
unknown model) raises a subclass of `UserError`. The binaries in
`tff_sam.experiments` print such an error as one line and exit non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem the user can fix; its message is one line naming the file or flag."""


class ConfigError(UserError):
  """An invalid flag or flag combination."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"--{flag}: {message}")
    self.flag = flag


def require(condition: bool, flag: str, message: str) -> None:
  """Raises `ConfigError(flag, message)` unless `condition` (for `validate` methods)."""
  if not condition:
    raise ConfigError(flag, message)


class DataError(UserError):
  """A problem with a data file or folder."""

  def __init__(self, path: object, message: str):
    super().__init__(f"{path}: {message}")
    self.path = str(path)


class ModelError(UserError):
  """A model that cannot be found, fetched or loaded."""


class FetchError(UserError):
  """A registry package that cannot be downloaded or fails its checksum."""
