"""User errors: mistakes in what the user asked for (config, data, paths, checkpoints, devices),
as opposed to bugs. The CLI prints a `UserError` as one line naming the key / file / tensor /
process and exits 2; a traceback only with `--debug`."""

from __future__ import annotations


class UserError(Exception):
  """A user-facing error; its message alone must say what to fix."""


class ResumeConfigError(UserError, ValueError):
  """A resume whose config changes the computation of the saved run."""
