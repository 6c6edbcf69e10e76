# Gunicorn + FastAPI under uvicorn_worker.UvicornWorker, configured from the environment:
#   CODE_DIR=/opt/code gunicorn -c deploy/gunicorn_uvicorn.conf.py
# Same environment as deploy/gunicorn.conf.py; the worker class is always UvicornWorker.
from drum_servers.gunicorn_uvicorn_conf import *  # noqa: F403
