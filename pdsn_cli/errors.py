"""User-facing errors and the process exit codes every command shares.

Exit codes (documented in the README):
  0  success
  2  bad arguments or bad input files: refused before any work, nothing written
  3  completed, but some inputs were skipped (listed in the summary / --json)
  4  the job failed while running (NaN loss, disk full, ...); previous outputs are intact
  130 interrupted (SIGINT); partial work is kept under a temp name for --resume
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SKIPPED = 3
EXIT_FAILED = 4
EXIT_INTERRUPTED = 130


class PdsnError(Exception):
    """An error the user can act on: printed as one line, no traceback."""

    exit_code = EXIT_USAGE


class BadInputError(PdsnError):
    """Bad argument or input file, detected before any work starts."""


class SchemaError(BadInputError):
    """A file (HDF5, checkpoint, dictionary) does not match what the command expects."""


class JobFailed(PdsnError):
    """The job started but could not finish (numerical fault, disk full)."""

    exit_code = EXIT_FAILED


def check_training_options(**values) -> None:
    """The usual training knobs, refused in one line before any work: counts ≥ 1 (epochs, batch_size, width),
    a positive lr, fractions (holdout, val_fraction) in [0, 1). Names are reported as their CLI options."""
    for name, v in values.items():
        opt = "--" + name.replace("_", "-")
        if name == "lr":
            ok, want = v > 0, "> 0"
        elif name in ("holdout", "val_fraction"):
            ok, want = 0.0 <= v < 1.0, "in [0, 1)"
        else:
            ok, want = v >= 1, "≥ 1"
        if not ok:
            raise BadInputError(f"{opt} must be {want}, got {v}")
