#!/usr/bin/env bash
# Production entry point (/start.sh): upstream's decisions (tiangolo/uvicorn-gunicorn), made in the shell,
# then the Gunicorn master, which checks every setting and what it will really use before it binds or
# forks: a mistake is one line on stderr and a non-zero exit. The defaults written here are the ones
# declared in gunicorn_prometheus/settings.py (a unit test compares them).
set -e

APP_DIR="${APP_DIR:-/app}"
if [ -f "$APP_DIR/app/main.py" ]; then
    DEFAULT_MODULE_NAME=app.main
elif [ -f "$APP_DIR/main.py" ]; then
    DEFAULT_MODULE_NAME=main
fi
MODULE_NAME="${MODULE_NAME:-${DEFAULT_MODULE_NAME:-}}"
if [ -z "${APP_MODULE:-}" ] && [ -n "$MODULE_NAME" ]; then
    APP_MODULE="$MODULE_NAME:${VARIABLE_NAME:-app}"
fi

if [ -z "${GUNICORN_CONF:-}" ]; then
    if [ -f "$APP_DIR/gunicorn_conf.py" ]; then
        GUNICORN_CONF="$APP_DIR/gunicorn_conf.py"
    elif [ -f "$APP_DIR/app/gunicorn_conf.py" ]; then
        GUNICORN_CONF="$APP_DIR/app/gunicorn_conf.py"
    else
        GUNICORN_CONF="${DEFAULT_GUNICORN_CONF:-/gunicorn_conf.py}"
    fi
fi

# The image sets PYTHONPATH=/app; outside it, the app directory must be importable all the same.
case ":${PYTHONPATH:-}:" in
    *":$APP_DIR:"*) ;;
    *) export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

# Sourced, not run: a failing command stops the start, and exported variables reach Gunicorn.
PRE_START_PATH="${PRE_START_PATH:-$APP_DIR/prestart.sh}"
echo "Checking for script in $PRE_START_PATH"
if [ -f "$PRE_START_PATH" ]; then
    echo "Running script $PRE_START_PATH"
    # shellcheck disable=SC1090
    . "$PRE_START_PATH"
else
    echo "There is no script $PRE_START_PATH"
fi

# The master replaces this shell: it is PID 1 in the container and receives the stop signal itself. Its
# command line is Gunicorn's (`-k`, `-c <the config file in use>`, the app), as tools for upstream read it.
exec python -m gunicorn_prometheus serve -k "${WORKER_CLASS:-uvicorn_worker.UvicornWorker}" \
    -c "$GUNICORN_CONF" ${APP_MODULE:+"$APP_MODULE"}
