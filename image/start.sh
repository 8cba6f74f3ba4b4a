#!/usr/bin/env bash
# Production entry point (/start.sh): the same decisions as tiangolo/uvicorn-gunicorn, validated first.
set -e

# Module detection, the GUNICORN_CONF search order and every setting are checked here, before anything
# starts: a mistake is one line on stderr and a non-zero exit.
exports=$(python -m gunicorn_prometheus resolve)
eval "$exports"

# Sourced, not run: a failing command stops the start, and exported variables reach Gunicorn.
echo "Checking for script in $PRE_START_PATH"
if [ -f "$PRE_START_PATH" ]; then
    echo "Running script $PRE_START_PATH"
    # shellcheck disable=SC1090
    . "$PRE_START_PATH"
else
    echo "There is no script $PRE_START_PATH"
fi

# Gunicorn replaces this shell: it is PID 1 in the container and receives the stop signal itself.
exec gunicorn -k "$WORKER_CLASS" -c "$GUNICORN_CONF" "$APP_MODULE"
