"""Command line of the package: the steps the start scripts call, and the README table generator.

python -m gunicorn_prometheus resolve          # validate; print `export` lines for /start.sh
python -m gunicorn_prometheus resolve-reload   # the same for /start-reload.sh (no Gunicorn)
python -m gunicorn_prometheus settings-table   # the README's environment table
"""

from __future__ import annotations

import os
import sys

from . import healthcheck, launch, settings
from .settings import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    try:
        if command in ("resolve", "resolve-reload"):
            exports = launch.resolve(os.environ, gunicorn=command == "resolve")
            sys.stdout.write(launch.shell_exports(exports))
            return 0
        if command == "healthcheck":
            return healthcheck.check(settings.load(os.environ))
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
    sys.exit(main())
