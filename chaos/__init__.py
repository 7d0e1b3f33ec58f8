"""Chaos failover experiments: `meshfed chaos run|list|validate` and `meshfed demo` drive this package.

- `engine`: runs experiments against a lab federation (one lab per fleet), step by step, and
  cleans up after each; the one engine (the demo is an experiment it runs, narrated);
- `validate`: an experiment against its fleet repo and the lab it lays out (the lab's own fault
  planner dry-runs every fault; pushes are replayed on the fleet's files);
- `analysis` (pure): request records + timeline -> figures (detect, shift, failed, flaps, failback);
- `expect` (pure): expectations -> verdicts with evidence (requests, events, log lines);
- `report`, `junit`: report.md + timeline.png + figures.json per experiment, a run's summary, JUnit XML;
- `demo`: the lab federation driver (`LabFederation`: lab up/attach, traffic, faults, pushes,
  the controller's status API) the engine and the lab tests use.

The experiment schema (`kind: ChaosExperiment`) is `gitops.experiment`: experiments are files read
at the fleet-repo boundary, as strictly as the fleet itself.
"""
