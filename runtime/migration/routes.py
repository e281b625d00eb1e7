"""The migration routes of the function runtime (the list is in protocol.py).

They live under `/_/`, next to health and readiness: internal endpoints for the controller and peer
instances, not for clients. Every one of them requires `Authorization: Bearer <SLLM_MIGRATION_TOKEN>`
(instances send it to each other, the coordinator sends it too); without a token set they are refused
(403), because they expose other callers' prompts and streams. /_/health, /_/ready and /metrics stay open.
This module imports no torch: the app registers the routes before the model (and torch) has loaded.
"""

from __future__ import annotations

import hmac
import os
import uuid
from typing import TYPE_CHECKING

from flask import Flask, Response, jsonify, request

from sllm_faas.common.jsonbody import JsonError, request_object
from sllm_faas.runtime.migration.protocol import PREFIX, ProtocolError, check_migration_id
from sllm_faas.runtime.migration.state import Migrations

if TYPE_CHECKING:
    from sllm_faas.runtime.server.app import Runtime


def register_migration_routes(app: Flask, runtime: Runtime) -> Migrations:
    """Add the migration endpoints to the runtime's app; returns the instance's migration registry."""
    migrations = Migrations(runtime)
    app.extensions["sllm_migrations"] = migrations
    token = os.environ.get("SLLM_MIGRATION_TOKEN", "")
    roles: dict[str, object] = {}

    def destination():
        if "destination" not in roles:
            from sllm_faas.runtime.migration.destination import Destination

            roles["destination"] = Destination(runtime, migrations)
        return roles["destination"]

    def engine():
        if runtime.loaded is None:
            raise ProtocolError(503, "this instance has no model loaded: " + (runtime.failure or "starting"))
        return runtime.loaded.engine

    def body() -> dict:
        try:
            return request_object()
        except JsonError as exc:
            raise ProtocolError(exc.status, exc.message) from None

    def status_of(migration_id: str):
        status = migrations.get(check_migration_id(migration_id))
        if status is None:
            raise ProtocolError(404, f"this instance knows no migration {migration_id}", "migration")
        return status

    @app.errorhandler(ProtocolError)
    def protocol_error(exc: ProtocolError):
        return jsonify(exc.body()), exc.status

    @app.before_request
    def authorize():
        if not (request.path == "/_/requests" or request.path.startswith(("/_/requests/", PREFIX))):
            return None
        if not token:
            raise ProtocolError(403, "migration is disabled until SLLM_MIGRATION_TOKEN is set on this instance "
                                     "(the migration routes expose other callers' requests)")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ProtocolError(401, "missing or wrong bearer token (SLLM_MIGRATION_TOKEN)")
        return None

    @app.get("/_/requests")
    def in_flight():
        """The requests in flight here, by the id their clients see; relayed ones included."""
        rows = [{"id": g.request_id, "state": g.state, "prompt_tokens": len(g.prompt_ids),
                 "completion_tokens": len(g.output_ids), "migration": getattr(migrations.active_for(g.request_id),
                                                                              "id", None)}
                for g in (engine().generations() if runtime.loaded else []) if g.request_id]
        rows += [{"id": s.request, "state": "relaying", "prompt_tokens": len(s.generation.prompt_ids),
                  "completion_tokens": len(s.generation.output_ids), "migration": s.id}
                 for s in migrations.all() if s.role == "source" and s.state == "relaying"]
        return {"object": "list", "data": rows}

    @app.post("/_/requests/<request_id>/migrate")
    def migrate(request_id: str):
        from sllm_faas.runtime.migration.protocol import MigrateOptions
        from sllm_faas.runtime.migration.source import SourceMigration

        raw = body()
        options = MigrateOptions.from_json(raw)
        migration_id = check_migration_id(raw.get("migration") or f"m-{uuid.uuid4().hex[:12]}")
        existing = migrations.get(migration_id)
        if existing is not None:
            if existing.role != "source" or existing.request != request_id:
                raise ProtocolError(409, f"migration id {migration_id} is in use for another request", "migration")
            return existing.as_json(), 200  # a coordinator retrying after a crash: same migration, same answer
        generation = next((g for g in engine().generations() if g.request_id == request_id), None)
        if generation is None:
            raise ProtocolError(404, f"no request {request_id!r} is in flight here", "request")
        if generation.state != "running" or migrations.active_for(request_id):
            state = "migrating" if migrations.active_for(request_id) else generation.state
            raise ProtocolError(409, f"request {request_id} is {state}; only a running request can be migrated",
                                "request")
        status = SourceMigration(migration_id, generation, options, runtime, migrations)
        if migrations.add(status) is not status:
            raise ProtocolError(409, f"migration id {migration_id} is in use", "migration")
        return status.start().as_json(), 202

    @app.get(PREFIX)
    def migration_list():
        return {"object": "list", "data": [s.as_json() for s in migrations.all()]}

    @app.get(PREFIX + "/<migration_id>")
    def migration_status(migration_id: str):
        return status_of(migration_id).as_json()

    @app.delete(PREFIX + "/<migration_id>")
    def migration_abort(migration_id: str):
        status = status_of(migration_id)
        if status.role == "source":
            if not status.abort():
                raise ProtocolError(409, f"migration {migration_id} is {status.state}: past the point of abort")
        elif not status.finished:
            destination().abort(status, "dropped at the source's request")
        return status.as_json()

    @app.post(PREFIX + "/<migration_id>/tokens")
    def migration_tokens(migration_id: str):
        return destination().tokens(check_migration_id(migration_id), body(), request.remote_addr or "")

    @app.post(PREFIX + "/<migration_id>/commit")
    def migration_commit(migration_id: str):
        stream = destination().commit(check_migration_id(migration_id), body())
        return Response(stream, mimetype="application/x-ndjson", headers={"Cache-Control": "no-cache",
                                                                         "X-Accel-Buffering": "no"})

    return migrations
