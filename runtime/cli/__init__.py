"""The ``ddpm-rt`` command. ``ddpm-rt --prompt TEXT`` is short for ``ddpm-rt generate``.

Generation imports only the runtime (no torch); ``train``/``export``/``eval``/``text``/``data``
import their stage lazily (cli_train.py). Errors are one line, ``error: ...``, exit 1 (2 for
usage); ``--debug`` shows the traceback.

Signals: this module's ``main`` (the command, never the library: an application that
embeds the runtime owns its signals) turns SIGINT and SIGTERM into an exception at any
moment after it starts, so temp files are removed on the way out, no traceback is printed,
and the exit status is 128 + the signal number. It keeps its imports light so that the
handlers are installed within milliseconds of the process starting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings

from ddpm_rt.errors import DdpmRtError, first_line

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signalled(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # signals seen, in case library code swallows or rewraps ours
_finishing: list[bool] = []  # set once the work is over: a late signal then changes nothing
_deferring: list[bool] = []  # set while native code that calls back into Python runs


def _raise_signalled(signum, frame):
    _received.append(signum)
    # not while main() switches the handlers off on its way out, nor inside a deferral
    if not _finishing and not _deferring:
        raise Signalled(signum)


def raise_if_signalled() -> None:
    """Raise :class:`Signalled` if SIGINT/SIGTERM arrived and was not acted on. The signal
    handler raises at once, but native code can swallow that exception (seen: an extension
    module's import and the compiler, under load), and the work then runs on: this is
    called before every file the CLI writes is committed and after every sampling step."""
    if _received and not _finishing and not _deferring:
        raise Signalled(_received[0])


@contextlib.contextmanager
def signals_deferred():
    """SIGINT/SIGTERM are recorded, not raised, while the block runs, and raised once it is
    over. For imports of native extensions (torch, onnx): a Python exception raised inside
    their pybind11 callbacks there ends in std::terminate (exit by SIGABRT, "terminate called
    after throwing an instance of 'pybind11::error_already_set'"), seen when a SIGTERM landed
    while ``ddpm-rt export`` imported torch."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _received and not _deferring and not _finishing:
        raise Signalled(_received[0])


def load_stage(module: str, extra: str):
    """A training, export or evaluation module (they import torch), imported with signals
    deferred, or an error naming the extra to install."""
    from ddpm_rt.extras import require

    with signals_deferred():
        return require(module, extra)


def build_parser():
    import argparse

    from ddpm_rt import __version__
    from ddpm_rt.cli.generate import add_generate_parsers
    from ddpm_rt.cli.gpu import add_gpu_parsers
    from ddpm_rt.cli.serve import add_serve_parser
    from ddpm_rt.cli.train import add_train_parsers

    p = argparse.ArgumentParser(prog="ddpm-rt", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ddpm-rt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("--debug", action="store_true", help="show tracebacks")

    add_generate_parsers(sub, common)
    add_train_parsers(sub, common)
    add_gpu_parsers(sub, common)
    add_serve_parser(sub, common)
    return p


def _commands(parser) -> list[str]:
    """The subcommands the parser knows (whoever added them)."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def _install_handlers() -> None:
    """A fresh start for :func:`main`: no signal seen yet, SIGINT/SIGTERM raise
    :class:`Signalled`, and every file commit checks for a signal first."""
    from ddpm_rt.bundle.fileio import add_commit_check

    _finishing.clear()
    _received.clear()
    add_commit_check(raise_if_signalled)
    for s in _SIGNALS:
        # an inherited "ignore" is kept (a shell's background job starts with SIGINT ignored)
        if signal.getsignal(s) != signal.SIG_IGN:
            signal.signal(s, _raise_signalled)


def _route(argv: list[str], commands: list[str]) -> bool:
    """Put ``generate`` in front of ``argv`` (in place) where it starts with a flag that
    names no command: ``ddpm-rt --prompt TEXT`` is short for ``ddpm-rt generate``. False,
    after printing the usage error, where its first word names no command."""
    if argv and argv[0] not in commands and argv[0] not in ("-h", "--help", "--version"):
        if not argv[0].startswith("-"):  # a word that names no command is a usage error
            print(
                f"error: unknown command {argv[0]!r:.40} (commands: {', '.join(commands)}; "
                "generate's flags may come first: ddpm-rt --prompt TEXT)",
                file=sys.stderr,
            )
            return False
        argv.insert(0, "generate")  # ddpm-rt --prompt TEXT: short for ddpm-rt generate
    return True


def _failed(e: Exception) -> int:
    """One line on stderr for a failure, and exit status 1."""
    if isinstance(e, DdpmRtError):
        print(f"error: {e}", file=sys.stderr)
    else:  # an unexpected failure still gets one line
        print(
            f"error: {type(e).__name__}: {first_line(e)} (run with --debug for details)",
            file=sys.stderr,
        )
    return 1


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI prints its messages: one line, no source location."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    _install_handlers()
    if "--debug" not in sys.argv[1:] + list(argv or []):
        warnings.formatwarning = _one_line_warning
    debug = False
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        parser = build_parser()
        if not _route(argv, _commands(parser)):
            return 2
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        rc = args.func(args)
        return _interrupted(_received[0]) if _received else rc
    except Signalled as e:
        return _interrupted(e.signum)
    except KeyboardInterrupt:  # raised by code that called the default handler itself
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BrokenPipeError:  # the reader went away (ddpm-rt info X.png | head): not an error
        # Python would report the pipe again while flushing stdout at exit; point it nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:
        if _received:  # our exception, rewrapped by library code (an import, __set_name__)
            return _interrupted(_received[0])
        if debug:
            raise
        return _failed(e)
    finally:
        # The work is done (or refused): a signal from here on changes nothing, so it is
        # ignored. Python's shutdown resets handlers it installed to the default action (a
        # late signal would kill the process mid-exit) but leaves ignored signals alone.
        # The flag first: a signal landing between the two handler switches must not raise
        # inside this block (it once did, on a loaded machine: a traceback after the PNG).
        _finishing.append(True)
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _interrupted(signum: int) -> int:
    for s in _SIGNALS:  # a second signal must not interrupt the way out
        signal.signal(s, signal.SIG_IGN)
    print(f"error: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum
