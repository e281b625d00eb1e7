"""Trace-driven cluster simulator: the scheduler core (`sllm_faas.controller.scheduler.rank`) placing function
instances on a simulated cluster, against the schedulers people run today, on the same trace.

config (scenario files) -> workload (the trace) -> engine (events, on cluster, asking policies) -> report.
"""
