"""The catalogue of fleet-repo problem codes: code -> title, explanation, default severity.

Codes are stable API: users grep for them and CI pipelines allow-list them. Never renumber; to
retire a code leave it in the catalogue marked retired. Ranges:

- MF00xx  reading files: encoding, YAML syntax, limits, repo layout, paths
- MF01xx  schema: unknown/missing fields, types, value ranges, names
- MF02xx  references and uniqueness across objects
- MF03xx  networks and addresses
- MF04xx  identity and trust
- MF05xx  traffic policy: outlier detection, locality failover, weights
- MF06xx  the local lab topology
- MF07xx  chaos experiments (ChaosExperiment files, outside the mesh config)

`problem(code, ...)` is the only way the rest of `gitops` creates a Problem, so every emitted code
is guaranteed to be in this catalogue (a unit test also checks that every code is emitted by at
least one test case).
"""

from __future__ import annotations

from dataclasses import dataclass

from gitops.problems import ObjectRef, Problem, Severity, SourcePos


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    title: str
    doc: str
    severity: Severity = Severity.ERROR


_CODES = (
    # --- MF00xx reading files ---------------------------------------------------------------
    Code("MF0001", "YAML syntax error",
         "The file is not valid YAML 1.2. The position is where the parser gave up."),
    Code("MF0002", "duplicate mapping key",
         "A key appears twice in the same mapping. YAML loaders disagree on which one wins "
         "(PyYAML keeps the last), so meshfed rejects the file instead of guessing."),
    Code("MF0003", "anchors, aliases, merge keys and tags are not allowed",
         "Anchors (&a), aliases (*a), merge keys (<<) and explicit tags (!tag) make a file mean "
         "something different from what a reviewer reads, and aliases allow 'billion laughs' "
         "expansion. Write the values out."),
    Code("MF0004", "file too large or nested too deep",
         "Each file is limited in size and nesting depth; the fleet repo is configuration, not data."),
    Code("MF0005", "file is not UTF-8",
         "Fleet-repo files must be UTF-8 encoded (a UTF-8 byte-order mark is tolerated)."),
    Code("MF0006", "path leaves the repository or is not a regular file",
         "Files are read only from inside the repository: no '..', no symlinks that resolve "
         "outside it, no submodules, no special files."),
    Code("MF0007", "not exactly one object in the file",
         "Each file holds exactly one object (one YAML document that is a mapping with "
         "apiVersion, kind, metadata and spec)."),
    Code("MF0008", "unknown apiVersion or kind",
         "The apiVersion/kind pair is not one meshfed accepts; the message lists the accepted pairs."),
    Code("MF0009", "file in the wrong place",
         "Objects live at fixed places: federation.yaml, clusters/<name>.yaml, "
         "trust/<domain>.yaml, services/<namespace>/<name>.yaml, policies/<namespace>/**/<name>.yaml, "
         "lab/<cluster>.yaml. A kind in another kind's directory, or a YAML file outside these "
         "directories, is an error. ChaosExperiment files are not mesh configuration: they live in "
         "the fleet repo's chaos/ directory (which the controller never reads) or anywhere else."),
    Code("MF0010", "path disagrees with the object's name",
         "The file name (and namespace directory) must match metadata.name (and "
         "metadata.namespace), so that a path always tells which object it holds."),
    Code("MF0011", "Federation missing or not unique",
         "The repository root must contain federation.yaml with the one Federation object."),
    Code("MF0012", "referenced file missing",
         "A file named by the configuration (e.g. an external CA bundle) is not in the repository."),
    Code("MF0013", "too many files",
         "The repository holds more fleet files than the configured limit."),
    # --- MF01xx schema -----------------------------------------------------------------------
    Code("MF0101", "unknown field",
         "The field is not part of the schema. meshfed never silently ignores fields: a typo "
         "would otherwise switch a policy off. The message lists the supported fields and the "
         "closest match."),
    Code("MF0102", "invalid value",
         "The value has the wrong type or is outside the allowed set or range."),
    Code("MF0103", "missing required field",
         "A field that has no default was not given."),
    Code("MF0104", "invalid duration",
         "Durations are written like Istio's: a number with a unit, e.g. 500ms, 5s, 1m30s, 2h."),
    Code("MF0105", "port out of range",
         "Ports are 1..65535."),
    Code("MF0106", "invalid name",
         "Names of clusters, networks, namespaces, services and workloads are DNS-1123 labels "
         "(lower-case letters, digits and '-', at most 63 characters, starting and ending with "
         "an alphanumeric character)."),
    Code("MF0107", "hostname does not match the service",
         "A GlobalService's hostname is <name>.<namespace>.svc.<clustersetDomain>; give that "
         "value or leave it out."),
    Code("MF0108", "field not supported by meshfed",
         "The field exists upstream (Istio / Gateway API) but meshfed does not implement it; "
         "the message lists what is supported."),
    Code("MF0109", "number out of range",
         "Every duration and count has a range that makes sense for it (a lease TTL of a second to "
         "an hour, a workload certificate of a minute to 90 days, ...); values outside it, including "
         "ones too large to represent, are rejected here instead of misbehaving at run time."),
    # --- MF02xx references and uniqueness ---------------------------------------------------
    Code("MF0201", "duplicate name",
         "Two objects of the same kind have the same name (also after case folding and Unicode "
         "NFKC normalisation, which would make them indistinguishable to a human)."),
    Code("MF0202", "unknown cluster",
         "A reference names a cluster that has no clusters/<name>.yaml."),
    Code("MF0203", "unknown trust domain",
         "A reference names a trust domain that has no trust/<domain>.yaml."),
    Code("MF0204", "unknown service",
         "A reference names a service that has no services/<namespace>/<name>.yaml."),
    Code("MF0205", "service exported from no cluster",
         "A GlobalService's exportFrom is empty or repeats a cluster."),
    # --- MF03xx networks and addresses ------------------------------------------------------
    Code("MF0301", "invalid CIDR or address",
         "A CIDR is not a valid network (host bits set, bad prefix), or an address is not an "
         "IP address or DNS name. 10.255.0.0/16 is reserved for meshfed's lab management network."),
    Code("MF0302", "overlapping CIDRs on the same network",
         "Two clusters on the same network (or one cluster's pod and service ranges) overlap: "
         "an address would name two endpoints and routing becomes ambiguous."),
    Code("MF0303", "east-west gateway address clash",
         "Two clusters declare the same east-west gateway address and port; each cluster needs "
         "its own gateway."),
    # --- MF04xx identity and trust ----------------------------------------------------------
    Code("MF0401", "invalid SPIFFE trust-domain name",
         "A SPIFFE trust domain is lower-case letters, digits, '.', '-', '_' only: no upper case "
         "(it is not folded silently), no port, no scheme, at most 255 bytes."),
    Code("MF0402", "cluster claims another cluster's trust domain with a different CA",
         "Two clusters may share a trust domain only if the same CA issues it; two CAs minting "
         "one trust domain let either impersonate the other's workloads, and peers verifying "
         "against one of the roots reject the other's."),
    Code("MF0403", "invalid trust relationship",
         "A trust domain federates with itself or lists a domain twice, or an external CA has no "
         "bundle file, or a managed CA does not have exactly one signing root."),
    Code("MF0404", "invalid principal",
         "AuthorizationPolicy principals are '<trust-domain>/ns/<namespace>/sa/<account>' (or '*' "
         "patterns), as in Istio. Source namespaces are a namespace of the destination's own trust "
         "domain ('shop'), or '<trust-domain>/ns/<namespace>' for another trust domain's ('*/ns/shop': "
         "any trust domain's): a bare name never matches another trust domain's namespace of that name."),
    Code("MF0405", "one-sided federation",
         "Trust domain A lists B in federatesWith but B does not list A: federation is explicit and must "
         "be declared on both sides (reported by the federation core's trust graph)."),
    Code("MF0406", "route to an untrusted cluster",
         "A client cluster would be routed to endpoints whose identities its trust domain does not "
         "accept; found when the trust graph is built, not at handshake time."),
    Code("MF0407", "unsafe CA root rotation",
         "A commit changes a managed CA's roots in a way that skips a stage of the staged rotation "
         "(publish the new root, switch the signer, retire the old root) or retires a root whose leaves "
         "are still live. Reported by the controller, which knows the applied revision and the leaves it "
         "issued; the commit is rejected and the last applied revision stays in force."),
    # --- MF05xx traffic policy ----------------------------------------------------------------
    Code("MF0501", "ejection durations make no sense",
         "interval and baseEjectionTime must be positive and maxEjectionTime must not be shorter "
         "than baseEjectionTime (Envoy caps the ejection time at max(base, maxEjectionTime))."),
    Code("MF0502", "cyclic or repeated failover",
         "A localityLbSetting.failover rule fails a region over to itself, two rules for the "
         "same 'from' region disagree, or failoverPriority repeats a label (the later level "
         "can never be reached)."),
    Code("MF0503", "failover points to an unknown cluster, network or region",
         "failover from/to regions and failoverPriority 'label=value' entries must name "
         "regions, networks and clusters that exist in the fleet."),
    Code("MF0504", "locality failover without outlier detection",
         "Failover to the next locality happens only when endpoints are ejected as unhealthy; "
         "without outlierDetection nothing is ever ejected, so failover would never trigger."),
    Code("MF0505", "maxEjectionPercent cannot eject a single host",
         "Envoy ejects a host only if (ejected + 1) / pool <= maxEjectionPercent / 100. With "
         "10% and fewer than 10 hosts nothing is ever ejected. meshfed computes the pool as the "
         "sum of the replicas of the service's server workloads in the LabClusters of its "
         "exportFrom clusters (when the fleet declares LabClusters)."),
    Code("MF0506", "more than one locality load-balancing mode",
         "localityLbSetting takes exactly one of failoverPriority, failover and distribute."),
    Code("MF0507", "weights do not add up",
         "distribute weights for one 'from' locality must sum to 100; route backend weights "
         "must not all be zero."),
    Code("MF0508", "percentage out of range",
         "maxEjectionPercent and minHealthPercent are 0..100."),
    Code("MF0509", "policy for one service declared twice",
         "Two DestinationRules name the same host, or two routes attach to the same service; "
         "meshfed would have to pick one, so it refuses both."),
    Code("MF0510", "5xx outlier detection without a waypoint",
         "consecutive5xxErrors counts HTTP 5xx answers, which only an L7 proxy sees. Without a waypoint "
         "(istio.io/use-waypoint on the Service or its Namespace) the node ztunnels see connections only: "
         "local connect failures count, a backend answering 503 never does.", Severity.WARNING),
    Code("MF0511", "request-level route on a service without a waypoint",
         "matches, filters, timeouts, retries, several rules and InferencePool backends are applied per "
         "request by a waypoint; a node ztunnel applies only backendRef weights, per connection. Enroll the "
         "Service (or its Namespace) in a waypoint, or keep one rule of weighted Service backends."),
    Code("MF0512", "request-level authorization that no L7 proxy enforces",
         "methods, paths, hosts and `when` conditions are seen only by a waypoint or an ingress gateway. A "
         "policy enforced by ztunnel (selector, or no targetRefs) cannot evaluate them: as Istio does, its ALLOW "
         "rules with request fields never match and its DENY rules with request fields match every connection. "
         "Target the Service behind a waypoint (targetRefs), or the Gateway.", Severity.WARNING),
    Code("MF0513", "unknown Gateway, waypoint, listener or InferencePool",
         "A reference names a Gateway (a waypoint or an ingress gateway), a listener (sectionName) or an "
         "InferencePool that the fleet repo does not declare, or a Gateway of the wrong kind."),
    Code("MF0514", "invalid match or filter",
         "A route match or filter value is invalid: a path that does not start with '/', a regular expression "
         "that does not compile, or a ReplacePrefixMatch rewrite without a PathPrefix match."),
    Code("MF0515", "inference pool problem",
         "An InferencePool selects no model-server pods in any lab cluster, or targets a port they do not serve.",
         Severity.WARNING),
    Code("MF0516", "commit removes too much of the fleet",
         "The commit removes more than spec.removal.maxClusterPercent of the clusters or "
         "spec.removal.maxEndpointPercent of the global endpoints (default 50 % each) and the "
         "Federation does not name those removals under spec.removal.intended. Reported by the "
         "controller (against the applied revision and the live endpoints) and by `meshfed plan` "
         "(against --from, with the LabCluster endpoints); the controller refuses the commit and the "
         "last applied revision stays in force."),
    # --- MF06xx lab ---------------------------------------------------------------------------
    Code("MF0601", "lab workload placed on an unknown node",
         "A LabCluster workload's nodes must be among the LabCluster's nodes."),
    Code("MF0602", "lab workload backs a service not exported from this cluster",
         "The workload names a service that is not exported from this cluster, so nothing "
         "would route to it.", Severity.WARNING),
    Code("MF0603", "exported service has no lab workload",
         "A service is exported from a lab cluster that runs no server workload for it; the "
         "export would have no endpoints there.", Severity.WARNING),
    # --- MF07xx chaos experiments (kind ChaosExperiment; gitops.experiment, chaos.validate) -------
    Code("MF0701", "fault does not apply",
         "A fault step lacks the parameter its kind needs (latency: delay, bandwidth: rate, clock-skew: "
         "skew, behaviour: behaviour), carries one its kind ignores, or names a target the lab cannot "
         "fault that way (the lab's own fault planner is asked, so the message is the lab's)."),
    Code("MF0702", "a step does not do exactly one thing",
         "Each step of setup and method is one of fault, heal, push or pause; a step with none or "
         "several of them is ambiguous about order."),
    Code("MF0703", "unknown or repeated fault id",
         "heal and an expectation's `fault` name a fault step by its id; the id must belong to a fault "
         "injected earlier in the method, and ids are unique within an experiment."),
    Code("MF0704", "push does not apply to the fleet repo",
         "An edit's `replace` text must occur exactly once in the file at that point of the experiment "
         "(edits of earlier pushes applied), the file must exist, and a patch must apply with `git apply`. "
         "A push does exactly one of edits, patch and restore."),
    Code("MF0705", "expectation cannot be measured",
         "failoverWithin needs a fault, failbackWithin a heal after it, every expectation a client "
         "that sends traffic, and servedBy at least one cluster."),
    Code("MF0706", "unknown cluster, workload or log in an experiment",
         "Clusters named by traffic, expectations and events must be clusters of the experiment's "
         "fleet; traffic comes from a client workload of that cluster's LabCluster; logs are read from "
         "a proxy of the lab (ztunnel/<cluster>/<node>, gateway/<cluster>) or the controller."),
    Code("MF0707", "the experiment's fleet repo cannot be used",
         "spec.fleet names the fleet repo the lab is built from (relative to the experiment file); it "
         "must be a directory with a federation.yaml that validates."),
    Code("MF0708", "experiment name not unique",
         "Two experiments of one run have the same metadata.name; reports are written per name, so one "
         "would overwrite the other."),
)

CATALOGUE: dict[str, Code] = {c.code: c for c in _CODES}


def problem(code: str, message: str, pos: SourcePos, hint: str = "", obj: ObjectRef | None = None,
            severity: Severity | None = None) -> Problem:
    """Create a Problem whose code must be in the catalogue (KeyError otherwise: a bug here)."""
    entry = CATALOGUE[code]
    return Problem(code=code, message=message, pos=pos, hint=hint, obj=obj,
                   severity=severity or entry.severity)
