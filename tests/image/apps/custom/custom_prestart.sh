#!/bin/sh
echo "custom prestart script ran"
export PRESTART_MARKER=custom
