"""The example function: {"question": "..."} in, a one-sentence {"answer": "..."} out.

It shapes the prompt (a system instruction, greedy decoding) and post-processes the reply; the
OpenAI-compatible API stays available beside it at /v1/... (see templates/sllm-python).
"""


def handle(event, context):
    body = event.body if isinstance(event.body, dict) else {}
    question = body.get("question")
    if not isinstance(question, str) or not question:
        return {"statusCode": 400, "body": {"error": "send {\"question\": \"...\"}"}}
    completion = context.llm.chat({
        "messages": [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": question},
        ],
        "max_tokens": int(body.get("max_tokens", 64)),
        "temperature": 0,
    })
    answer = completion["choices"][0]["message"]["content"].strip()
    return {"statusCode": 200, "body": {"answer": answer, "usage": completion["usage"]}}
