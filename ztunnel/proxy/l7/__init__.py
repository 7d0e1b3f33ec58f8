"""The L7 engine shared by waypoints and ingress gateways (`ztunnel.proxy.waypoint`).

Pure decisions, no sockets, no clock (time and randomness are arguments):

  routing   which HTTPRoute rule a request matches (Gateway API precedence), its filters, the
            backend drawn by weight per request
  retry     Istio's retry semantics: what is retried, backoff, how an attempt's outcome feeds
            Envoy's outlier detection
  pool      connectionPool accounting: upstream connections, pending requests, requests per connection
  picker    the built-in inference endpoint picker: least queue among the pods serving the model
  normalize the one normal form of a request's method, target and host (or 400), before any decision
  engine    one request's plan: normalization, route, authorization (`ztunnel.api.authz`, the one evaluator), backend
  http1     HTTP/1.1 on both sides: llhttp (httptools) parses, sans-IO
  h2c       HTTP/2 prior knowledge downstream through h2 (sans-IO)
"""
