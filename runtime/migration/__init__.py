"""Live migration of in-flight generations between function instances (ServerlessLLM, OSDI'24, section 5).

Tokens move, never the KV cache: the source sends the prompt and the tokens generated so far, the
destination recomputes the cache (prefill) while the source keeps generating, and rounds repeat with
the new tokens until fewer than a threshold remain. The source then pauses, sends the last tokens,
and the destination samples on from exactly that position. The client's connection stays on the
source, which relays the destination's tokens and frees its cache slot at the handover.

- protocol.py: the wire format (JSON, validated field by field) and the instance-side endpoints;
- source.py: the source's side (rounds, pause, handover, relay, taking the request back);
- destination.py: the destination's side (staging rounds, resuming, streaming the continuation);
- state.py: what each instance knows of its migrations, their metrics and incidents;
- record.py: the migration record in Redis, a state machine written only by its owner;
- routes.py: the HTTP routes, registered on the runtime's Flask app;
- faults.py: fault injection at named protocol steps, for the tests.

The coordinator (controller/migration.py) creates the record, starts the source and mirrors its
progress; docs/MIGRATION.md describes the protocol, the states and the failure handling.
"""
