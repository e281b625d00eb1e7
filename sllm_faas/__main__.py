"""`python -m sllm_faas VERB ...`: the `sllm-faas` command, for a process that has only an interpreter."""

from sllm_faas.runtime.cli import main

raise SystemExit(main())
