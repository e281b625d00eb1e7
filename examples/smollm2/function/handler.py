"""Your function's hook. The OpenAI-compatible API (/v1/...) is always served; `/` calls `handle`.

event:   .body (parsed JSON, or raw bytes), .headers, .method, .query, .path
context: .hostname, and .llm: .chat(body) / .complete(body) run the model with an OpenAI-style
         request body and return the OpenAI-style response.
Return {"statusCode": int, "body": dict | str, "headers": dict}.
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
