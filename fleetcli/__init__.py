"""The one runner of the three commands: ``fleet-provision``, ``fleet-hub``, ``fleet-sim``.

DESIGN section 8: every expected failure is one line on stderr, ``error: <what> (<where>)``,
with no traceback; exit codes 0 done, 1 a failure or rejected input, 2 usage. Each CLI builds
its Typer app with :func:`new_app` and its console-script entry point is
``main(argv=None) -> int``, which returns :func:`run_cli`'s code (the script exits with it).

A leaf: it imports typer and the standard library, nothing of ours, so ``provisioning``
(which imports nothing of ours), ``hub`` (which may not import ``device_sim`` nor the CA's
internals) and ``device_sim`` can all use it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer

__all__ = ["ErrorCodes", "new_app", "run_cli"]

ErrorCodes = Sequence[tuple[type[Exception], int | None]]
"""A package's expected errors, most specific first, each with its exit code (None: the
error's own ``exit_code`` attribute)."""


def new_app(help_text: str, **options: Any) -> typer.Typer:
    """A Typer app (or sub-app) as the three commands make them.

    Plain click help (``rich_markup_mode=None``): rich markup reads ``[default: ...]`` in a
    help string as a style tag and drops it (issue 11 defect 11), and it cut long lines.
    Without arguments the help is printed (exit 2, by :func:`run_cli`); tracebacks are never
    prettified, there is no shell-completion option.
    """
    settings: dict[str, Any] = {"no_args_is_help": True, "pretty_exceptions_enable": False,
                                "add_completion": False, "rich_markup_mode": None}
    settings.update(options)
    return typer.Typer(help=help_text, **settings)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def run_cli(app: typer.Typer, argv: list[str] | None, *, prog_name: str,
            errors: ErrorCodes = ()) -> int:
    """Run *app* on *argv* (None: ``sys.argv[1:]``) and return the exit code.

    Usage errors name the command (``(fleet-hub serve)``), exit 2; the package's own errors
    print their ``str()`` with the code *errors* gives; an ``OSError`` the code did not turn
    into one of those is a runtime failure: its reason and file (or the command), exit 1.
    """
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return _fail("aborted", 2)
    except typer.TyperException as exc:  # click's UsageError family, vendored by typer
        if type(exc).__name__ == "NoArgsIsHelpError":  # its message is the help text
            sys.stdout.write(exc.format_message().rstrip("\n") + "\n")
            return 2
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else prog_name
        return _fail(f"{exc.format_message()} ({where})", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # re-raised unless expected: a bug keeps its traceback
        for kind, code in errors:
            if isinstance(exc, kind):
                own = int(getattr(exc, "exit_code", 1))
                return _fail(str(exc), code if code is not None else own)
        if isinstance(exc, OSError):
            return _fail(f"{exc.strerror or exc} ({exc.filename or prog_name})", 1)
        raise
    return int(result) if isinstance(result, int) else 0  # typer.Exit(n) comes back as n
