"""The Qwen3 example function: {"message": "..."} in, {"reply": "...", "usage": {...}} out.

One chat turn, greedy. The example's weights are random (examples/qwen3/README.md), so the reply is
gibberish; the OpenAI-compatible API stays available beside it at /v1/... (see templates/sllm-python).
"""

from sllm_faas.common.jsonbody import loads_object


def handle(event, context):
    body = loads_object(event.body, "the request body")
    message = body.get("message")
    if not isinstance(message, str) or not message:
        return {"statusCode": 400, "body": {"error": "send {\"message\": \"...\"}"}}
    completion = context.llm.chat({"messages": [{"role": "user", "content": message}],
                                   "max_tokens": body.get("max_tokens", 32), "temperature": 0})
    return {"statusCode": 200, "body": {"reply": completion["choices"][0]["message"]["content"],
                                        "usage": completion["usage"]}}
