"""Run `refilled` in-process and check how it ended, shared by the CLI, fault and other tests."""

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


def ok(result: tuple[object, str, str]) -> str:
    """Assert a zero exit; return stdout."""
    rc, out, err = result
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def failed(result: tuple[object, str, str]) -> str:
    """Assert a clean non-zero exit (no traceback); return stderr."""
    rc, out, err = result
    assert isinstance(rc, int) and rc != 0, f"expected a non-zero exit, got {rc}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    return err
