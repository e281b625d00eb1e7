"""The migration routes of the function runtime (the list is in protocol.py).

They live under `/_/`, next to health and readiness: internal endpoints for the controller and peer
instances, not for clients. Every one of them requires `Authorization: Bearer <SLLM_MIGRATION_TOKEN>`
(instances send it to each other, the coordinator sends it too); without a token set they are refused
(403), because they expose other callers' prompts and streams. /_/health, /_/ready and /metrics stay open.
This module imports no torch: the app registers the routes before the model (and torch) has loaded.
"""

from __future__ import annotations

import hmac
import uuid

from flask import Blueprint, Response, request

from sllm_faas.common.errors import ApiError
from sllm_faas.common.jsonbody import request_object
from sllm_faas.runtime.migration.host import Host, loaded_engine
from sllm_faas.runtime.migration.protocol import PREFIX, check_migration_id
from sllm_faas.runtime.migration.state import Migrations


def migration_routes(host: Host, migrations: Migrations, token: str) -> Blueprint:
    """The migration endpoints of one instance, as a Blueprint for the runtime's app; `token` is the bearer
    token they require (SLLM_MIGRATION_TOKEN; empty refuses them all)."""
    routes = Blueprint("migration", __name__)
    roles: dict[str, object] = {}

    def destination():
        if "destination" not in roles:
            from sllm_faas.runtime.migration.destination import Destination

            roles["destination"] = Destination(host, migrations)
        return roles["destination"]

    def status_of(migration_id: str):
        status = migrations.get(check_migration_id(migration_id))
        if status is None:
            raise ApiError(404, f"this instance knows no migration {migration_id}", "migration")
        return status

    @routes.before_request
    def authorize() -> None:
        if not token:
            raise ApiError(403, "migration is disabled until SLLM_MIGRATION_TOKEN is set on this instance "
                                "(the migration routes expose other callers' requests)")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token (SLLM_MIGRATION_TOKEN)")

    @routes.get("/_/requests")
    def in_flight():
        """The requests in flight here, by the id their clients see; relayed ones included."""
        engine = host.engine
        rows = [{"id": g.request_id, "state": g.state, "prompt_tokens": len(g.prompt_ids),
                 "completion_tokens": len(g.output_ids), "migration": getattr(migrations.active_for(g.request_id),
                                                                              "id", None)}
                for g in (engine.generations() if engine else []) if g.request_id]
        rows += [{"id": s.request, "state": "relaying", "prompt_tokens": len(s.generation.prompt_ids),
                  "completion_tokens": len(s.generation.output_ids), "migration": s.id}
                 for s in migrations.all() if s.role == "source" and s.state == "relaying"]
        return {"object": "list", "data": rows}

    @routes.post("/_/requests/<request_id>/migrate")
    def migrate(request_id: str):
        from sllm_faas.runtime.migration.protocol import MigrateOptions
        from sllm_faas.runtime.migration.source import SourceMigration

        raw = request_object()
        options = MigrateOptions.from_json(raw)
        migration_id = check_migration_id(raw.get("migration") or f"m-{uuid.uuid4().hex[:12]}")
        existing = migrations.get(migration_id)
        if existing is not None:
            if existing.role != "source" or existing.request != request_id:
                raise ApiError(409, f"migration id {migration_id} is in use for another request", "migration")
            return existing.as_json(), 200  # a coordinator retrying after a crash: same migration, same answer
        generation = next((g for g in loaded_engine(host).generations() if g.request_id == request_id), None)
        if generation is None:
            raise ApiError(404, f"no request {request_id!r} is in flight here", "request")
        if generation.state != "running" or migrations.active_for(request_id):
            state = "migrating" if migrations.active_for(request_id) else generation.state
            raise ApiError(409, f"request {request_id} is {state}; only a running request can be migrated",
                                "request")
        status = SourceMigration(migration_id, generation, options, host, migrations)
        if migrations.add(status) is not status:
            raise ApiError(409, f"migration id {migration_id} is in use", "migration")
        return status.start().as_json(), 202

    @routes.get(PREFIX)
    def migration_list():
        return {"object": "list", "data": [s.as_json() for s in migrations.all()]}

    @routes.get(PREFIX + "/<migration_id>")
    def migration_status(migration_id: str):
        return status_of(migration_id).as_json()

    @routes.delete(PREFIX + "/<migration_id>")
    def migration_abort(migration_id: str):
        status = status_of(migration_id)
        if status.role == "source":
            if not status.abort():
                raise ApiError(409, f"migration {migration_id} is {status.state}: past the point of abort")
        elif not status.finished:
            destination().abort(status, "dropped at the source's request")
        return status.as_json()

    @routes.post(PREFIX + "/<migration_id>/tokens")
    def migration_tokens(migration_id: str):
        return destination().tokens(check_migration_id(migration_id), request_object(), request.remote_addr or "")

    @routes.post(PREFIX + "/<migration_id>/commit")
    def migration_commit(migration_id: str):
        stream = destination().commit(check_migration_id(migration_id), request_object())
        return Response(stream, mimetype="application/x-ndjson", headers={"Cache-Control": "no-cache",
                                                                         "X-Accel-Buffering": "no"})

    return routes
