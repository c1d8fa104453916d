"""The two HTTP APIs, each a thin translation to one ``GenerationRequest``: OpenAI Images and
AUTOMATIC1111 (with its sampler names and the ControlNet extension), plus the fields both add (LoRAs,
few-step controls)."""
