#!/usr/bin/env bash
# Development entry point (/start-reload.sh): one Uvicorn process that restarts when the code changes.
# No Gunicorn, so gunicorn_conf.py, BIND, workers, timeouts, log files and the metrics port do not apply.
set -e

exports=$(python -m gunicorn_prometheus resolve-reload)
eval "$exports"

echo "Checking for script in $PRE_START_PATH"
if [ -f "$PRE_START_PATH" ]; then
    echo "Running script $PRE_START_PATH"
    # shellcheck disable=SC1090
    . "$PRE_START_PATH"
else
    echo "There is no script $PRE_START_PATH"
fi

exec uvicorn --reload --reload-dir "${APP_DIR:-/app}" --app-dir "${APP_DIR:-/app}" \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-80}" --log-level "${LOG_LEVEL:-info}" "$APP_MODULE"
