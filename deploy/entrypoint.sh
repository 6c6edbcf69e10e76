#!/bin/sh
# Container entry point: serve the model in CODE_DIR with gunicorn. exec makes gunicorn PID 1,
# so it receives SIGTERM and its exit code is the container's.
#   DRUM_SERVER=flask|fastapi   which app (default flask)
#   any other argument          run that command instead (e.g. `drum-servers download`)
set -eu
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec drum-servers serve --server "${DRUM_SERVER:-flask}"
