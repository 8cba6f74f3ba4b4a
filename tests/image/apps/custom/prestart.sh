#!/bin/sh
echo "default prestart script ran"
export PRESTART_MARKER=default
