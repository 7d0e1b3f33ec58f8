"""The proxy's side of the control plane: the config subscription (sans-IO rules + gRPC client), the
link that bootstraps and keeps certificates, and the validated config state with its persisted
last good copy.
"""
