"""The local lab: the fleet's clusters in Linux network namespaces inside a private sandbox, with
real processes, an emulated Kubernetes API per cluster, faults, and a control socket.

Pure decisions: `topology` (the plan), `faults.plan_fault`, `commands` (what the lab runs, with
which flags), `layout` (state-directory names, ports, exec targets), `kubelet.desired_objects`,
`tokens` (the emulated API server's ServiceAccount tokens: TokenRequest, TokenReview).

Host side (where `meshfed lab` runs): `runner` (LabRunner, LabOptions), `nsexec` (exec by entering
the sandbox's namespaces), `control` (the control socket's client), `sandbox` (unshare, sweep).

Sandbox side: `supervisor` composes `processes` (process table; init as PID 1), `bringup` (the
numbered steps), `proxies` (node ztunnels and gateways), `injector` (faults applied and healed),
`control` (the server), `pods`; with the services `apiserver`, `kubelet`, `gitserver`, `portal`.
Processes the lab starts: `demo_server`, `loadgen`, the latency relay in `faults`.
"""
