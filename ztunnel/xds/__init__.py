"""The proxy's side of the control plane: the config subscription (sans-IO rules + gRPC client), the
link that bootstraps, keeps and persists its certificates (`controlplane`), the channels that pin
the controller's SPIFFE ID (`channel`), and the validated config state with its persisted last
good copy.
"""
