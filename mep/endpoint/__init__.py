"""The user endpoint: runs as the researcher's account and executes their tasks on an engine.

Started by the spawner (``python -m mep.endpoint``) with its boot document on
stdin; the only process besides the SDK that deserialises user payloads.
"""
