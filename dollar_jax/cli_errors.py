"""How the command lines (dollar_jax.main, dollar_jax.sample, tools/*) end on an error a person must fix.

A wrong config key, a missing dataset or weight folder, a converter mismatch: the message the code raises
already names the problem and the fix, so it is printed as one `error:` line (plus, for errors that list
several keys, those lines indented below, at most MAX_DETAIL_LINES) and the process exits with status 1.
The Python traceback, which only helps someone debugging dollar-jax itself, is printed with --verbose.
"""

from __future__ import annotations

import ast
import re
import sys
import traceback

MAX_DETAIL_LINES = 20
# Raised by our own checks with a message meant for the user (ConversionError, CheckpointError,
# DatasetError, PrecomputeError, SafetensorsError are ValueErrors). Anything else is reported with its type.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, KeyError)


def _config_key_error(error: BaseException, argv) -> str | None:
    """ml_collections' locked-config error for an unknown key (an AttributeError or KeyError whose message is
    the repr of "'key'\nDid you mean ...") as one sentence naming the command-line override."""
    if not isinstance(error, (AttributeError, KeyError)) or not error.args:
        return None
    text = str(error.args[0])
    for _ in range(2):  # the message may be quoted once or twice (KeyError inside AttributeError)
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                break
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    if not key.isidentifier():
        return None
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                 a.split("=", 1)[0].split(".")[-1] == key), None)
    if flag is None and "Did you mean" not in hint:
        return None  # some other AttributeError/KeyError (a bug, say): not to be explained as a config key
    where = f"{flag}: " if flag else ""
    return (f"{where}{key!r} is not a config key{'; ' + hint.strip() if hint.strip() else ''} "
            f"(the keys are listed in dollar_jax/config.py base_config())")


def error_lines(error: BaseException, argv=()) -> list[str]:
    """The lines printed for `error`: 'error: <first line>' then indented detail lines."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = _config_key_error(error, argv) or str(message).strip() or type(error).__name__
    if not isinstance(error, USER_ERRORS) and not _config_key_error(error, argv):
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
    for line in error_lines(error, sys.argv):
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


def define_verbose_flag():
    """The --verbose flag of the absl command lines (dollar_jax.main, dollar_jax.sample), defined once: both
    modules can be imported into one process (tests, notebooks), where a second definition is an error."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "Print the traceback of an error (otherwise one line naming the problem).")
    return flags.FLAGS["verbose"]


def verbose_in(argv) -> bool:
    """--verbose on a command line whose flags may not have parsed (the error can be a flag's)."""
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def flag_error_text(error: BaseException) -> str:
    """absl's flag errors can hold a whole traceback (a config file that raised): keep the flag and the last
    line, the exception the config file raised."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1])
        return f"{lines[0].rstrip(':')}: {last}"
    return " ".join(lines)


def run_absl(main) -> int:
    """`absl.app.run(main)` with errors reported by `report`, including those raised while parsing flags
    (an unknown --config.key override or a config file that raises fails there, before `main` runs)."""
    from absl import app, flags

    verbose = verbose_in(sys.argv)
    try:
        argv = flags.FLAGS(sys.argv)  # parsed here so that a bad flag is one line, not absl's usage dump
    except flags.Error as e:
        return report(ValueError(flag_error_text(e)), verbose)
    except Exception as e:  # noqa: BLE001 - e.g. ml_collections' unknown-key error for --config.x=...
        return report(e, verbose)
    try:
        app.run(main, flags_parser=lambda _: argv)  # parsed once: config_flags cannot parse twice
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001
        return report(e, verbose)
    return 0
