"""What every role of Burla shares: configuration, tracing, version, local paths, HTTP, retries.

Below the client (`burla`), the daemon (`burla.daemon`) and the node agent (`burla.node_agent`);
above the wire protocol (`burla.schemas`). Nothing here imports those three.
"""
