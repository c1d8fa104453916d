"""The engine-directory format: the ground floor that engine/ (the writer) and runtime/ (the reader) share.

* :mod:`.manifest`: ``manifest.json`` (schema, atomic save, load checks against this machine);
* :mod:`.profiles`: optimization profiles from the contracts and buckets, and their selection;
* :mod:`.layout`: file names, runtime assets and each backend's per-directory facts;
* :mod:`.environment`: file hashes, library versions and the device identity;
* :mod:`.torch_program`: loading (and compiling) a saved ``torch.export`` program, which the build
  verifies and compiles exactly as the runtime will run it.

Nothing here imports a stage (export/, engine/, runtime/, serve/); tests/test_layers.py checks it.
"""
