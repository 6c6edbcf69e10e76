"""What DRUM's prediction server promises its clients, as these servers reproduce it.

``datarobot-drum`` 1.18.1 is the oracle (``make parity`` compares the two): its header names,
its version string in ``X-Drum-Version`` and ``/info/``, and its answers to the routes an
unstructured model does not serve.
"""

from __future__ import annotations

DRUM_COMPAT_VERSION = "1.18.1"

REQUEST_ID_HEADER = "X-Request-ID"
DRUM_REQUEST_ID_HEADER = "X_Request_ID"  # DRUM's spelling, sent beside the standard one
DRUM_VERSION_HEADER = "X-Drum-Version"
USER_HTTP_ERROR_HEADER = "X-Drum-User-Http-Error"

TARGET_TYPE = "unstructured"
# DRUM's two messages, word for word (the second prints the enum).
WRONG_ENDPOINT_MESSAGES = {
    "/predict/": f"ERROR: This model has target type '{TARGET_TYPE}', use the "
                 "/predictUnstructured/ or /predictionsUnstructured/ endpoint.",
    "/transform/": "ERROR: This model has target type TargetType.UNSTRUCTURED, use the "
                   "/predictUnstructured/ endpoint.",
}
WRONG_ENDPOINT_ROUTES = {"/predict/": WRONG_ENDPOINT_MESSAGES["/predict/"],
                         "/predictions/": WRONG_ENDPOINT_MESSAGES["/predict/"],
                         "/invocations": WRONG_ENDPOINT_MESSAGES["/predict/"],
                         "/transform/": WRONG_ENDPOINT_MESSAGES["/transform/"]}
CAPABILITIES = {"supported_methods": {"chat": False},
                "supported_payload_formats": {"csv": None, "mtx": None}}
