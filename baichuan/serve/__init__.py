"""The OpenAI-compatible server: `protocol` (request/response schemas), `engine` (continuous batching) and
`app` (FastAPI routes, SSE, errors, the chat page). Importing the package loads none of them, so the engine
can be used without fastapi installed."""
