"""Run `refilled` in-process, shared by the CLI and fault tests."""

import contextlib
import io
import traceback


def cli(argv: list) -> tuple[object, str, str]:
    """`refilled argv` in-process: (exit code, stdout, stderr). Never raises: an uncaught
    exception is a failure of the CLI, reported as the exit code "uncaught exception"."""
    from refilled.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc(file=err)
            rc = "uncaught exception"
    return rc, out.getvalue(), err.getvalue()
