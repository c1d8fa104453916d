"""The playground page (``GET /``) and the OpenAPI page (``GET /docs``): static files shipped as package data.

The page is plain HTML, CSS and JavaScript with no build step; it talks only to the service's own APIs, as any
client would, so it adds no route that changes server state and nothing on the APIs' request path.
"""
