"""The controller on Ray: the only package that imports `ray`.

Actors are thin wrappers around `federation.controller` classes; placement pins the state owner
(store and CA keys) to one node, while discovery agents may run anywhere.
"""
