"""How the command lines (dollar_jax.main, dollar_jax.sample, tools/*) end on an error a person must fix.

A wrong config key, a missing dataset or weight folder, a converter mismatch: the message the code raises
already names the problem and the fix, so it is printed as one `error:` line (plus, for errors that list
several keys, those lines indented below, at most MAX_DETAIL_LINES) and the process exits with status 1.
The Python traceback, which only helps someone debugging dollar-jax itself, is printed with --verbose.
"""

from __future__ import annotations

import sys
import traceback

MAX_DETAIL_LINES = 20
# Raised by our own checks with a message meant for the user (ConversionError, CheckpointError,
# DatasetError, PrecomputeError, SafetensorsError are ValueErrors). Anything else is reported with its type.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, KeyError)


def error_lines(error: BaseException) -> list[str]:
    """The lines printed for `error`: 'error: <first line>' then indented detail lines."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = str(message).strip() or type(error).__name__
    if not isinstance(error, USER_ERRORS):
        text = f"{type(error).__name__}: {text}"
    first, *rest = [line for line in text.splitlines() if line.strip()]
    lines = [f"error: {first}"]
    lines += ["  " + line.strip() for line in rest[:MAX_DETAIL_LINES]]
    if len(rest) > MAX_DETAIL_LINES:
        lines.append(f"  ... and {len(rest) - MAX_DETAIL_LINES} more")
    return lines


def report(error: BaseException, verbose: bool, stream=None) -> int:
    """Print `error` for a person (the traceback too when `verbose`); return the exit status (1)."""
    stream = stream or sys.stderr
    if verbose:
        traceback.print_exception(error, file=stream)
    for line in error_lines(error):
        print(line, file=stream)
    stream.flush()
    return 1


def run_reporting(fn, verbose: bool, *args, **kwargs) -> int:
    """Call fn(*args, **kwargs); a raised Exception becomes `report(...)`. Returns fn's status or 1.

    KeyboardInterrupt and SystemExit pass through: stopping a run is not an error to explain.
    """
    try:
        status = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the whole point: one readable line instead of a traceback
        return report(e, verbose)
    return 0 if status is None else int(status)
