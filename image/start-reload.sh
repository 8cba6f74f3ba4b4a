#!/usr/bin/env bash
# Development entry point (/start-reload.sh): one Uvicorn process that restarts when the code changes.
# No Gunicorn, so gunicorn_conf.py, BIND, workers, timeouts, log files and the metrics port do not apply.
# The defaults written here are the ones declared in gunicorn_prometheus/settings.py (a unit test
# compares them).
set -e

APP_DIR="${APP_DIR:-/app}"
case ":${PYTHONPATH:-}:" in
    *":$APP_DIR:"*) ;;
    *) export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

PRE_START_PATH="${PRE_START_PATH:-$APP_DIR/prestart.sh}"
echo "Checking for script in $PRE_START_PATH"
if [ -f "$PRE_START_PATH" ]; then
    echo "Running script $PRE_START_PATH"
    # shellcheck disable=SC1090
    . "$PRE_START_PATH"
else
    echo "There is no script $PRE_START_PATH"
fi

# Checks every setting (one line per mistake), then becomes `uvicorn --reload` on HOST, PORT, LOG_LEVEL.
exec python -m gunicorn_prometheus reload
