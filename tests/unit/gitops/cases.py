"""Bad-input matrix: each case edits the good example fleet and names the problem it must cause.

(id, edits, code, "file:line:col", exit status of `meshfed validate`). Kept as data so that the
same table drives the loader test, the CLI test and the "every code is exercised" test.
"""

from __future__ import annotations

from tests.unit.gitops.conftest import Edit

DR = "policies/shop/checkout.yaml"
EAST = "clusters/east.yaml"
WEST = "clusters/west.yaml"
TD_EAST = "trust/east.mesh.local.yaml"
CHECKOUT = "services/shop/checkout.yaml"
ROUTE = "policies/shop/checkout-canary.yaml"
AUTHZ = "policies/shop/checkout-allow-frontend.yaml"
LAB_EAST = "lab/east.yaml"
LAB_SOUTH = "lab/south.yaml"
OD = "      maxEjectionPercent: 100\n"
C5 = "      # consecutive5xxErrors needs a waypoint to see HTTP status (MF0510); Envoy's default 5 applies\n"
NS_SHOP = "namespaces/shop.yaml"
WAYPOINT = "policies/shop/waypoint.yaml"
# Enroll namespace shop in a waypoint: the edits L7 cases start from.
WITH_WAYPOINT: tuple[Edit, ...] = (
    ("write", NS_SHOP, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n"
                       "    istio.io/use-waypoint: waypoint\n"),
    ("write", WAYPOINT, "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n"
                        "  namespace: shop\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n"
                        "    - name: mesh\n      port: 15008\n      protocol: HBONE\n"),
)
ROUTE_L7 = ("replace", ROUTE, "  rules:\n    - backendRefs:\n",
            "  rules:\n    - matches:\n        - path:\n            type: PathPrefix\n            value: /api\n"
            "      backendRefs:\n")

Case = tuple[str, tuple[Edit, ...], str, str, int]

CASES: list[Case] = [
    # --- reading files
    ("yaml-syntax", (("replace", EAST, "  network: net-east", "  network: [net-east"),), "MF0001", "clusters/east.yaml:9:11", 1),
    ("duplicate-key", (("replace", EAST, "  network: net-east\n", "  network: net-east\n  network: net-west\n"),),
     "MF0002", "clusters/east.yaml:9:3", 1),
    ("anchor-alias", (("replace", WEST, "  network: net-west", "  network: &n net-west\n  trustDomain2: *n"),),
     "MF0003", "clusters/west.yaml:8:12", 1),
    ("explicit-tag", (("replace", WEST, "  network: net-west", "  network: !custom net-west"),), "MF0003", "clusters/west.yaml:8:12", 1),
    ("too-large", (("write", "clusters/big.yaml", "# " + "x" * 300_000 + "\n"),), "MF0004", "clusters/big.yaml:1:1", 1),
    ("too-deep", (("write", "clusters/deep.yaml", "a: " + "[" * 40 + "]" * 40 + "\n"),), "MF0004", "clusters/deep.yaml:1:36", 1),
    ("not-utf8", (("bytes", "clusters/latin.yaml", b"apiVersion: v1\n# caf\xe9\n"),), "MF0005", "clusters/latin.yaml:2:6", 1),
    ("symlink-out", (("symlink", "clusters/outside.yaml", "/etc/hostname"),), "MF0006", "clusters/outside.yaml", 1),
    ("submodule", (("mkdir", "policies/vendored/.git"),), "MF0006", "policies/vendored", 1),
    ("two-documents", (("replace", EAST, "apiVersion", "---\na: 1\n---\napiVersion"),), "MF0007", "clusters/east.yaml:4:1", 1),
    ("unknown-kind", (("replace", EAST, "kind: Cluster", "kind: Clustr"),), "MF0008", "clusters/east.yaml:2:7", 1),
    ("wrong-apiversion", (("replace", DR, "networking.istio.io/v1", "networking.istio.io/v2"),), "MF0008", "policies/shop/checkout.yaml:1:13", 1),
    ("kind-in-wrong-dir", (("move", "services/shop/cart.yaml", "clusters/cart.yaml"),), "MF0009", "clusters/cart.yaml:3:1", 1),
    ("path-name-mismatch", (("move", "services/shop/cart.yaml", "services/shop/basket.yaml"),), "MF0010", "services/shop/basket.yaml:3:1", 1),
    ("no-federation", (("delete", "federation.yaml"),), "MF0011", "federation.yaml", 1),
    ("bundle-missing", (("replace", TD_EAST, "    mode: Managed\n    roots:\n      - name: root-1\n        signing: true\n",
                         "    mode: External\n    bundleFile: trust/bundles/east.json\n"),), "MF0012", "trust/east.mesh.local.yaml:11:5", 1),
    # --- schema
    ("unknown-field", (("replace", DR, "maxEjectionPercent: 100", "maxEjectionPercnt: 100"),), "MF0101", "policies/shop/checkout.yaml:14:7", 1),
    ("unknown-top-field", (("replace", EAST, "spec:", "specs:"),), "MF0101", "clusters/east.yaml:7:1", 1),
    ("invalid-value-type", (("replace", LAB_EAST, "replicas: 2", "replicas: \"2\""),), "MF0102", "lab/east.yaml:13:17", 1),
    ("invalid-enum", (("replace", LAB_EAST, "behaviour: Healthy", "behaviour: healthy"),), "MF0102", "lab/east.yaml:17:18", 1),
    ("missing-field", (("replace", CHECKOUT, "  serviceAccount: checkout\n", ""),), "MF0103", "services/shop/checkout.yaml:7:1", 1),
    ("bad-duration", (("replace", DR, "interval: 5s", "interval: 5sec"),), "MF0104", "policies/shop/checkout.yaml:12:17", 1),
    ("duration-not-string", (("replace", DR, "interval: 5s", "interval: 5"),), "MF0104", "policies/shop/checkout.yaml:12:17", 1),
    ("port-out-of-range", (("replace", CHECKOUT, "port: 80\n", "port: 70000\n"),), "MF0105", "services/shop/checkout.yaml:15:13", 1),
    ("authz-port-out-of-range", (("replace", AUTHZ, "\"8080\"", "\"80800\""),), "MF0105", "policies/shop/checkout-allow-frontend.yaml:22:17", 1),
    ("bad-network-name", (("replace", EAST, "network: net-east", "network: Net_East"),), "MF0106", "clusters/east.yaml:8:12", 1),
    ("hostname-mismatch", (("replace", CHECKOUT, "  serviceAccount: checkout\n",
                            "  serviceAccount: checkout\n  hostname: checkout.shop.svc.cluster.local\n"),),
     "MF0107", "services/shop/checkout.yaml:13:3", 1),
    ("name-trailing-newline", (("replace", EAST, "network: net-east", 'network: "net-east\\n"'),), "MF0106", "clusters/east.yaml:8:12", 1),
    ("duration-trailing-newline", (("replace", DR, "interval: 5s", 'interval: "5s\\n"'),), "MF0104", "policies/shop/checkout.yaml:12:17", 1),
    ("lease-ttl-overflows", (("replace", "federation.yaml", "leaseTTL: 30s", "leaseTTL: " + "9" * 400 + "s"),),
     "MF0109", "federation.yaml:14:15", 1),
    ("cert-ttl-zero", (("replace", TD_EAST, "workloadCertTTL: 24h", "workloadCertTTL: 0s"),), "MF0109", "trust/east.mesh.local.yaml:14:22", 1),
    ("replicas-too-many", (("replace", LAB_EAST, "replicas: 2", "replicas: 5000"),), "MF0109", "lab/east.yaml:13:17", 1),
    ("upstream-unsupported", (("replace", DR, "  trafficPolicy:\n", "  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n"),),
     "MF0108", "policies/shop/checkout.yaml:9:5", 1),
    ("route-gateway-parent", (("replace", ROUTE, "kind: Service", "kind: Gateway"),), "MF0108", "policies/shop/checkout-canary.yaml:9:7", 1),
    ("selector-in-without-values", (("replace", EAST, "  podCIDRs:", "  namespaceSelector:\n    matchExpressions:\n"
                                     "      - key: mesh\n        operator: In\n  podCIDRs:"),),
     "MF0102", "clusters/east.yaml:21:9", 1),
    ("selector-bad-operator", (("replace", EAST, "  podCIDRs:", "  namespaceSelector:\n    matchExpressions:\n"
                                "      - key: mesh\n        operator: Exist\n  podCIDRs:"),),
     "MF0102", "clusters/east.yaml:22:19", 1),
    # --- references and uniqueness
    ("duplicate-name-casefold", (("write", "policies/shop/more/Checkout.yaml",
                                  "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n"
                                  "  name: Checkout\n  namespace: shop\nspec:\n  host: cart.shop.svc.clusterset.local\n"),),
     "MF0201", "policies/shop/more/Checkout.yaml:4:3", 1),
    ("unknown-cluster", (("replace", CHECKOUT, "    - south\n", "    - sooth\n"),), "MF0202", "services/shop/checkout.yaml:11:7", 1),
    ("unknown-trust-domain", (("replace", WEST, "trustDomain: west.mesh.local", "trustDomain: west.mesh.locl"),),
     "MF0203", "clusters/west.yaml:12:3", 1),
    ("unknown-service-host", (("replace", DR, "host: checkout.shop", "host: chekout.shop"),), "MF0204", "policies/shop/checkout.yaml:7:3", 1),
    ("unknown-route-backend", (("replace", ROUTE, "name: checkout-v2", "name: checkout-v3"),), "MF0204", "policies/shop/checkout-canary.yaml:18:11", 1),
    ("export-twice", (("replace", CHECKOUT, "    - south\n", "    - south\n    - east\n"),), "MF0205", "services/shop/checkout.yaml:12:7", 1),
    # --- networks
    ("cidr-host-bits", (("replace", EAST, "10.10.0.0/16", "10.10.0.1/16"),), "MF0301", "clusters/east.yaml:20:7", 1),
    ("cidr-reserved", (("replace", EAST, "10.10.0.0/16", "10.255.0.0/16"),), "MF0301", "clusters/east.yaml:20:7", 1),
    ("cidr-overlap-same-network", (("replace", WEST, "network: net-west", "network: net-east"),
                                   ("replace", WEST, "10.20.0.0/16", "10.10.128.0/17")), "MF0302", "clusters/west.yaml:20:7", 1),
    ("gateway-clash", (("replace", WEST, "172.30.0.12", "172.30.0.11"),), "MF0303", "clusters/west.yaml:17:5", 1),
    # --- identity and trust
    ("trust-domain-uppercase", (("replace", TD_EAST, "name: east.mesh.local", "name: East.mesh.local"),),
     "MF0401", "trust/east.mesh.local.yaml:4:3", 1),
    ("trust-domain-port", (("replace", TD_EAST, "name: east.mesh.local", "name: east.mesh.local:8443"),),
     "MF0401", "trust/east.mesh.local.yaml:4:3", 1),
    ("trust-domain-too-long", (("replace", TD_EAST, "name: east.mesh.local", "name: " + "a" * 250 + ".mesh.local"),),
     "MF0401", "trust/east.mesh.local.yaml:4:3", 1),
    ("claims-other-trust-domain", (("replace", WEST, "trustDomain: west.mesh.local",
                                    "trustDomain: east.mesh.local\n  ca:\n    mode: Managed\n    roots:\n"
                                    "      - name: west-root\n        signing: true"),), "MF0402", "clusters/west.yaml:13:3", 1),
    ("federates-with-self", (("replace", TD_EAST, "    - west.mesh.local\n",
                              "    - west.mesh.local\n    - east.mesh.local\n"),), "MF0403", "trust/east.mesh.local.yaml:8:7", 1),
    ("principal-with-scheme", (("replace", AUTHZ, "- east.mesh.local/ns", "- spiffe://east.mesh.local/ns"),),
     "MF0404", "policies/shop/checkout-allow-frontend.yaml:16:17", 1),
    ("source-namespace-not-qualified-right", (("replace", AUTHZ, "            principals:\n",
                                               "            namespaces:\n              - west.mesh.local/shop\n"
                                               "            principals:\n"),),
     "MF0404", "policies/shop/checkout-allow-frontend.yaml:16:17", 1),
    # --- traffic policy
    ("max-ejection-time-below-base", (("replace", DR, OD, OD + "      maxEjectionTime: 10s\n"),), "MF0501", "policies/shop/checkout.yaml:15:7", 1),
    ("failover-priority-repeated", (("replace", DR, "          - topology.kubernetes.io/region\n",
                                     "          - topology.kubernetes.io/region\n          - topology.istio.io/network\n"),),
     "MF0502", "policies/shop/checkout.yaml:22:13", 1),
    ("failover-to-itself", (("replace", DR, "        failoverPriority:\n          - topology.kubernetes.io/region\n"
                             "          - topology.istio.io/network\n",
                             "        failover:\n          - from: us-east\n            to: us-east\n"),), "MF0502", "policies/shop/checkout.yaml:20:13", 1),
    ("failover-unknown-cluster", (("replace", DR, "          - topology.istio.io/network\n",
                                   "          - topology.istio.io/cluster=nowhere\n"),), "MF0503", "policies/shop/checkout.yaml:21:13", 1),
    ("failover-unknown-region", (("replace", DR, "        failoverPriority:\n          - topology.kubernetes.io/region\n"
                                  "          - topology.istio.io/network\n",
                                  "        failover:\n          - from: us-east\n            to: eu-west\n"),),
     "MF0503", "policies/shop/checkout.yaml:21:13", 1),
    ("failover-without-outlier-detection", (("replace", DR, "    outlierDetection:\n      consecutiveGatewayErrors: 3\n"
                                             "      # consecutive5xxErrors needs a waypoint to see HTTP status (MF0510); Envoy's default 5 applies\n"
                                             "      interval: 5s\n"
                                             "      baseEjectionTime: 15s\n" + OD, ""),), "MF0504", "policies/shop/checkout.yaml:10:7", 1),
    ("max-ejection-percent-too-small", (("replace", DR, OD, "      maxEjectionPercent: 10\n"),), "MF0505", "policies/shop/checkout.yaml:14:7", 1),
    ("two-locality-modes", (("replace", DR, "          - topology.istio.io/network\n",
                             "          - topology.istio.io/network\n        failover:\n"
                             "          - from: us-east\n            to: us-west\n"),), "MF0506", "policies/shop/checkout.yaml:22:9", 1),
    ("route-weights-zero", (("replace", ROUTE, "weight: 90", "weight: 0"), ("replace", ROUTE, "weight: 10", "weight: 0")),
     "MF0507", "policies/shop/checkout-canary.yaml:14:7", 1),
    ("distribute-not-100", (("replace", DR, "        failoverPriority:\n          - topology.kubernetes.io/region\n"
                             "          - topology.istio.io/network\n",
                             "        distribute:\n          - from: us-east/*\n            to:\n"
                             "              us-east/*: 80\n              us-west/*: 10\n"),), "MF0507", "policies/shop/checkout.yaml:21:13", 1),
    ("percent-out-of-range", (("replace", DR, OD, "      maxEjectionPercent: 150\n"),), "MF0508", "policies/shop/checkout.yaml:14:27", 1),
    ("two-routes-one-service", (("write", "policies/shop/checkout-other.yaml",
                                 "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n"
                                 "  name: checkout-other\n  namespace: shop\nspec:\n  parentRefs:\n"
                                 "    - kind: Service\n      group: \"\"\n      name: checkout\n  rules:\n"
                                 "    - backendRefs:\n        - name: checkout\n          port: 80\n"),),
     "MF0509", "policies/shop/checkout-other.yaml:8:7", 1),
    # --- L7: waypoints, request-level routes and authorization, gateways, inference pools
    ("5xx-without-waypoint", (("replace", DR, C5, "      consecutive5xxErrors: 5\n"),), "MF0510",
     "policies/shop/checkout.yaml:11:7", 0),
    ("l7-route-without-waypoint", (ROUTE_L7,), "MF0511", "policies/shop/checkout-canary.yaml:13:3", 1),
    ("l7-authz-without-targetrefs", (("replace", AUTHZ, "            ports:\n", "            methods: [GET]\n"
                                      "            ports:\n"),), "MF0512", "policies/shop/checkout-allow-frontend.yaml:12:3", 0),
    ("use-waypoint-unknown", (("write", NS_SHOP, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n"
                               "  labels:\n    istio.io/use-waypoint: waypont\n"),), "MF0513", "namespaces/shop.yaml:5:3", 1),
    ("route-bad-path", (*WITH_WAYPOINT, ("replace", ROUTE, "  rules:\n    - backendRefs:\n",
                                         "  rules:\n    - matches:\n        - path:\n            type: Exact\n"
                                         "            value: api\n      backendRefs:\n")),
     "MF0514", "policies/shop/checkout-canary.yaml:17:13", 1),
    ("pool-selects-nothing", (("write", "policies/shop/pool.yaml",
                               "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata:\n"
                               "  name: pool\nspec:\n  selector:\n    matchLabels:\n      app: vllm\n"
                               "  targetPorts:\n    - number: 8000\n  endpointPickerRef:\n    name: epp\n"
                               "    port:\n      number: 9002\n"),), "MF0515", "policies/shop/pool.yaml:6:3", 0),
    # --- lab
    ("lab-unknown-node", (("replace", LAB_EAST, "nodes: [node-2]", "nodes: [node-3]"),), "MF0601", "lab/east.yaml:30:15", 1),
    ("lab-backs-unexported-service", (("replace", LAB_SOUTH, "    - name: frontend\n",
                                       "    - name: cart\n      namespace: shop\n      service: cart\n"
                                       "      serviceAccount: cart\n    - name: frontend\n"),), "MF0602", "lab/south.yaml:20:7", 0),
    ("lab-export-without-workload", (("replace", "services/shop/cart.yaml", "    - west\n", "    - west\n    - south\n"),),
     "MF0603", "lab/south.yaml:9:3", 0),
]
