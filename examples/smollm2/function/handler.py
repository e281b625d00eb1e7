"""The example function: {"question": "..."} in, a one-sentence {"answer": "..."} out.

It shapes the prompt (a system instruction, greedy decoding) and post-processes the reply; the
OpenAI-compatible API stays available beside it at /v1/... (see templates/sllm-python).
`event.body` is the raw request bytes, as in OpenFaaS python3-http; a body that is not acceptable JSON,
or a bad `max_tokens`, is a 400 naming the problem.
"""

from sllm_faas.common.jsonbody import loads_object


def handle(event, context):
    body = loads_object(event.body, "the request body")
    question = body.get("question")
    if not isinstance(question, str) or not question:
        return {"statusCode": 400, "body": {"error": "send {\"question\": \"...\"}"}}
    completion = context.llm.chat({
        "messages": [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": question},
        ],
        "max_tokens": body.get("max_tokens", 64),  # checked by the runtime like an OpenAI request's
        "temperature": 0,
    })
    answer = completion["choices"][0]["message"]["content"].strip()
    return {"statusCode": 200, "body": {"answer": answer, "usage": completion["usage"]}}
