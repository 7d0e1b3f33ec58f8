"""Chaos failover experiments: request records in, figures and reports out (`analysis`, `report`), and
the lab federation driver the demo and experiments use (`demo`).
"""
