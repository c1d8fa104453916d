"""The service core: the batching queue (``AsyncPipeline``), the service's life (``Service``), its
settings and errors. No web library here."""
