"""Command line of the package: what the start scripts and the image's HEALTHCHECK run.

python -m gunicorn_prometheus serve [gunicorn arguments]  # the master (/start.sh): -k, -c, module:app
python -m gunicorn_prometheus reload                      # /start-reload.sh: check, then Uvicorn --reload
python -m gunicorn_prometheus healthcheck                 # the image's HEALTHCHECK
python -m gunicorn_prometheus settings-table              # the README's environment table
"""

from __future__ import annotations

import os
import signal
import sys


def _reload() -> int:
    """Validate, then become `uvicorn --reload` on HOST/PORT/LOG_LEVEL (no Gunicorn, no metrics)."""
    from . import launch, settings

    values = settings.current()
    launch.check_reload(values)
    app_dir = values.app_dir
    args = [
        sys.executable, "-m", "uvicorn", "--reload", "--reload-dir", app_dir, "--app-dir", app_dir,
        "--host", values.host, "--port", str(values.port), "--log-level", values.log_level, str(values.app),
    ]  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, args)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: a Ctrl-C during these imports ends as one too (see the bottom).
    from . import settings
    from .settings import ConfigError

    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    try:
        if command == "serve":
            values = settings.current()  # before Gunicorn is imported: it reads WEB_CONCURRENCY at import
            from . import early_start

            started = early_start.start(values)  # the metrics peer boots while Gunicorn is imported
            from .application import serve

            return serve(args[1:], started)
        if command == "reload":
            return _reload()
        if command == "healthcheck":
            from . import healthcheck

            return healthcheck.check(settings.current())
        if command == "settings-table":
            sys.stdout.write(settings.markdown_table())
            return 0
    except ConfigError as err:
        for line in str(err).splitlines():
            print(f"gunicorn-prometheus: configuration error: {line}", file=sys.stderr)
        return 2
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        # Gunicorn's own handler makes SIGINT a quick shutdown even when the master inherited it ignored
        # (a background job's); until that handler is installed, the same: not a signal lost.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C before Gunicorn has its own handlers (while modules or the config file load): what was
        # started is stopped on the way out (application.serve). End as SIGINT would, without a traceback.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
