"""``drum-servers``: download artifacts, serve a model under gunicorn, or run the demo."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from lazy_loading import ConfigError, LazyLoadingError, LazyLoadingHandler, ProgressSnapshot
from lazy_loading.environ import warn_about_environ

from . import variables as _variables  # noqa: F401 - registers the servers' variable names
from .signals import stop_signals_exit

logger = logging.getLogger("drum_servers")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress_bar() -> tuple[object, object]:
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="lazy loading",
               file=sys.stderr)

    def update(snap: ProgressSnapshot) -> None:
        if bar.total != snap.bytes_total:
            bar.total = snap.bytes_total
        bar.n = snap.bytes_done
        bar.set_postfix_str(f"{snap.files_done}/{snap.files_total} files", refresh=False)
        bar.refresh()

    return bar, update


def cmd_download(args: argparse.Namespace) -> int:
    handler = LazyLoadingHandler(code_dir=args.code_dir, values_file=args.lazy_loading_file)
    warn_about_environ(os.environ)
    if not handler.is_lazy_loading_available:
        print("error: lazy loading is not configured: set MLOPS_LAZY_LOADING_DATA or pass "
              "--lazy-loading-file", file=sys.stderr)
        return 1
    bar = None
    if sys.stderr.isatty() and not args.verbose:
        bar, update = _progress_bar()
        handler.subscribe(update)  # type: ignore[arg-type]
        logging.getLogger("lazy_loading").setLevel(logging.WARNING)
    try:
        with stop_signals_exit():
            results = handler.download_lazy_loading_files()
    except LazyLoadingError as exc:
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()  # type: ignore[attr-defined]
    print(f"{len(results)} files ready in {handler.code_dir}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Exec gunicorn so it owns the process: its exit code and signal handling are the server's."""
    from .extras import require, server_extras
    from .settings import ServerSettings

    overrides = {"CODE_DIR": args.code_dir, "MAX_WORKERS": args.workers, "ADDRESS": args.address,
                 "LAZY_LOADING_FILE": args.lazy_loading_file, "LAZY_LOADING_MODE": args.mode,
                 "DRUM_GUNICORN_WORKER_CLASS": args.worker_class}
    env = dict(os.environ)
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    try:
        require(*server_extras(args.server), purpose=f"drum-servers serve --server {args.server}")
        ServerSettings.from_environ(env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    conf = ("drum_servers.gunicorn_conf" if args.server == "flask"
            else "drum_servers.gunicorn_uvicorn_conf")
    argv = [sys.executable, "-m", "gunicorn", "-c", f"python:{conf}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 1  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import run_demo

    code_dir = Path(args.code_dir) if args.code_dir else None
    try:
        return run_demo(args.address, args.server, args.workers, code_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, as argparse sizes its help."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized as argparse sizes it but without importing ``shutil`` for that: each
    parser built imports it, with ``bz2`` and ``lzma``, about 2 ms of every init container's
    start."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """Sub-commands' parsers are of this class too (``add_subparsers`` uses the parent's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="drum-servers", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging")
    sub = parser.add_subparsers(dest="command", required=True)
    download = sub.add_parser(
        "download", help="fetch every lazy-loading artifact into the code dir, then exit",
        description="Fetch, verify and publish every lazy-loading artifact (exit 0), or print "
                    "one line naming what is wrong (exit 1).",
    )
    download.add_argument("--lazy-loading-file", default=os.environ.get("LAZY_LOADING_FILE"),
                          help="DRUM values YAML (default: $LAZY_LOADING_FILE); otherwise "
                               "$MLOPS_LAZY_LOADING_DATA is used")
    download.add_argument("--code-dir", default=os.environ.get("CODE_DIR"),
                          help="model code dir; relative localPaths resolve here "
                               "(default: $CODE_DIR or the current directory)")
    download.set_defaults(func=cmd_download)

    serve = sub.add_parser(
        "serve", help="run the model under gunicorn (Flask or FastAPI) with lazy loading",
        description="Exec gunicorn with the matching deploy config; gunicorn owns the exit code.",
    )
    serve.add_argument("--code-dir", default=os.environ.get("CODE_DIR"), required=
                       not os.environ.get("CODE_DIR"), help="model code dir with custom.py")
    serve.add_argument("--server", choices=["flask", "fastapi"], default="flask")
    serve.add_argument("--workers", type=int, help="worker processes (default: $MAX_WORKERS or 1)")
    serve.add_argument("--address", help="host:port (default: $ADDRESS or 0.0.0.0:8080)")
    serve.add_argument("--worker-class", choices=["gthread", "sync", "gevent"],
                       help="Flask worker class (default: $DRUM_GUNICORN_WORKER_CLASS or gthread)")
    serve.add_argument("--lazy-loading-file", help="DRUM values YAML (default: $LAZY_LOADING_FILE)")
    serve.add_argument("--mode", choices=["blocking", "background"],
                       help="readiness mode (default: $LAZY_LOADING_MODE or blocking)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo", help="serve a sample model lazy-loaded from an embedded S3 server on loopback",
    )
    demo.add_argument("--address", default=os.environ.get("ADDRESS", "127.0.0.1:8080"))
    demo.add_argument("--server", choices=["flask", "fastapi"], default="flask")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--code-dir", help="where to put the sample model (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``drum-servers`` command: ``main``, then an exit without the interpreter's final
    garbage collections. Those walk every object the imports made, about 25 ms of each
    init container's start, to free memory the process is about to give back anyway."""
    code = main()
    gc.disable()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
