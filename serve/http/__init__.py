"""The HTTP edge: the ASGI app and its middleware (auth, body and header limits, metrics, error shapes),
uvicorn with a drain, and client bytes in and out (images, text checks)."""
