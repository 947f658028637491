"""The HTTP API: match products, upsert and delete them, check health; `create_app()` builds it.

One process serves one open Index: the models load once at startup, and the embedded engine
(which allows a single opener) is opened once. Encoding and engine calls run in the threadpool;
concurrent requests' encodings are batched (prodsearch.serving), and writes run one at a time.
A bounded queue admits the requests (serving.Admission): past it, 503 with Retry-After.

Errors are JSON `{"detail": ...}`: a message naming the field or item and the reason, or, for a
body that does not fit the schema, FastAPI's list of `{"loc", "msg", "type"}`.
"""

from prodsearch.api.routes import create_app

__all__ = ["create_app"]
