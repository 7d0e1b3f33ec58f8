"""A proxy's own identities at run time: the certificate manager (keys generated here, CSRs to the
controller, rotation at half-life) and the TLS adapters (`ssl` contexts, the memory-BIO transport).
"""
