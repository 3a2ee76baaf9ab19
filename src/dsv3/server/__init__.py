"""An OpenAI-compatible HTTP server over `dsv3.inference.engine` (needs the `serve` extra: fastapi, uvicorn).

`protocol` holds OpenAI's request/response types, `app` the routes (`create_app`), `metrics` the
Prometheus text, `commands` the `dsv3 serve` subcommand. Importing this package imports none of them,
so the CLI starts without fastapi installed.
"""
