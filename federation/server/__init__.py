"""I/O adapters of the controller: the gRPC services proxies talk to (config, certificates, health),
the status HTTP API the CLI reads, and the Prometheus exposition. Policy lives in
`federation.controller`; these modules translate between the wire and those classes.
"""
