# Gunicorn + Flask, configured from the environment:
#   CODE_DIR=/opt/code gunicorn -c deploy/gunicorn.conf.py
# ADDRESS, MAX_WORKERS, DRUM_GUNICORN_WORKER_CLASS (sync|gevent), DRUM_GUNICORN_TIMEOUT, ... and
# LAZY_LOADING_MODE are documented in the README's configuration table. The master prefetches
# the artifacts once (on_starting); each worker re-checks them cheaply (post_fork).
from drum_servers.gunicorn_conf import *  # noqa: F403
