"""The contract between the controller and the proxies.

Types and wire format (`config`, `codec`, `proto/`), names (`identity`: SPIFFE ids and the
control plane's own identities; `ports`), and the rules both ends must evaluate identically —
`authz` (the one L4 authorization evaluator: proxies enforce it, `meshfed plan` predicts with it),
`outlier` (Envoy's ejection state machine), `lb` (priority load with overprovisioning and panic),
`verify` and `bundle` (trust-domain-bound certificate verification, SPIFFE bundles). Imports
nothing of ours outside this package.
"""
