"""The wire protocol every part of Burla speaks.

Imports nothing of Burla's, so the worker shim can carry this package into any
container. `envelope` frames bytes, `messages` holds the messages of the HTTP
API, `worker` the protocol between a node agent and its workers.
"""
