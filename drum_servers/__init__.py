"""Server adapters (Flask, FastAPI, Gunicorn, DRUM hooks) over the ``lazy_loading`` handler."""
