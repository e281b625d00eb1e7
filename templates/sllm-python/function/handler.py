"""Your function's hook. The OpenAI-compatible API (/v1/...) is always served; `/` calls `handle`.

event:   .body (the raw request bytes, as in OpenFaaS python3-http), .headers, .method, .query, .path
context: .hostname, and .llm (sllm_faas.runtime.server.app.LLM): .chat(body) / .complete(body) run the
         model with an OpenAI-style request body and return the OpenAI-style response (bad parameters become
         a 400 in OpenAI's error shape); .model is the served model's name.
`/` and any other path but /v1/..., /_/... and /metrics call `handle`.
Return {"statusCode": int, "body": dict | str, "headers": dict}.
"""

from sllm_faas.common.jsonbody import loads_object


def handle(event, context):
    body = loads_object(event.body, "the request body")  # not acceptable JSON: a 400 naming the problem
    if not isinstance(body.get("prompt"), str):
        return {"statusCode": 400, "body": {"error": 'send {"prompt": "...", "max_tokens": 64}'}}
    result = context.llm.complete({"prompt": body["prompt"], "max_tokens": body.get("max_tokens", 64)})
    return {"statusCode": 200, "body": {"completion": result["choices"][0]["text"]}}
