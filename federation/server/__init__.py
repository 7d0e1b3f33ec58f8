"""I/O adapters of the controller: the gRPC services proxies talk to (config, certificates, health),
the status HTTP API the CLI reads and the web console on the same listener (`console`: HTML
panels rendered here, escaped by `html`, the graph drawn by `console_graph`, static files and the
vendored htmx in `static/`), and the Prometheus exposition. Policy lives in
`federation.controller`; these modules translate between the wire and those classes.
"""
