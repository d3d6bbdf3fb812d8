"""burlad: Burla's control plane (and, as ``burlad agent``, its node agent).

The control plane keeps cluster state, the standby spec and the input queue
in one SQLite file (`store`), decides which inputs run where (`scheduler`),
and serves the API clients and agents speak (`app`, `service`).
"""
