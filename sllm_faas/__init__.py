"""sllm-faas: serverless LLM inference with near-zero cold starts, as a plugin for Knative and OpenFaaS.

One import namespace over the repository's folders: `sllm_faas.runtime` (runtime/), `sllm_faas.controller`
(controller/), `sllm_faas.redis_schema` (redis_schema/), and `sllm_faas.common`, the shared plumbing that
depends on nothing else of ours (docs/ARCHITECTURE.md).
"""

__version__ = "0.1.0"
