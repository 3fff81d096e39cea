"""`t2r-export serve`: an OpenAI-compatible HTTP server over a bundle (app.py), the continuous-batching
decode loop behind it (engine.py) and its threads' priorities (priority.py), the request shapes and
chat template (protocol.py), an in-process server for tests (local.py) and the load test (load.py).
Torch-free; needs the `serve` extra, imported only by the modules that use it."""
