"""Local mode: the whole system on one machine (`sllm-faas up`), with an OpenFaaS-compatible gateway."""
