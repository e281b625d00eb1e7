"""sllm-faas placement controller: the pure scheduler core (scheduler.py) and its I/O edges (cluster.py
reads Redis, booking.py books slots, placement.py decides, service.py serves HTTP, kube.py speaks
Kubernetes)."""
