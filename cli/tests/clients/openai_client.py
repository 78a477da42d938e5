"""Drives a Potluck pool with the official `openai` client and prints what it saw as JSON.

Usage: openai_client.py BASE_URL API_KEY MODEL
"""
import json
import sys

import openai

base_url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
question = [{"role": "user", "content": "What is the capital of Japan?"}]
out = {}

chat = client.chat.completions.create(
    model=model, messages=question, temperature=0, seed=1, max_tokens=24
)
out["chat"] = chat.choices[0].message.content
out["chat_finish"] = chat.choices[0].finish_reason
out["chat_usage"] = chat.usage.completion_tokens

pieces = []
usage = None
for chunk in client.chat.completions.create(
    model=model,
    messages=question,
    temperature=0,
    seed=1,
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
out["stream"] = "".join(pieces)
out["stream_usage"] = usage

done = client.completions.create(
    model=model, prompt="The capital of France is", temperature=0, max_tokens=16
)
out["completion"] = done.choices[0].text

out["models"] = [m.id for m in client.models.list().data]

# The Responses API, as newer clients call it: whole, then streamed.
resp = client.responses.create(
    model=model, input="What is the capital of Japan?", temperature=0, max_output_tokens=24
)
out["responses"] = resp.output_text
out["responses_tokens"] = resp.usage.output_tokens
pieces = []
final = None
for event in client.responses.create(
    model=model,
    input=[{"role": "user", "content": "What is the capital of Japan?"}],
    temperature=0,
    max_output_tokens=24,
    stream=True,
):
    if event.type == "response.output_text.delta":
        pieces.append(event.delta)
    elif event.type in ("response.completed", "response.incomplete"):
        final = event.response.output_text
out["responses_stream"] = "".join(pieces)
out["responses_stream_final"] = final

# Left to itself the client asks for base64 and decodes it; floats when told.
texts = ["The capital of Japan is Tokyo.", "Volunteers pool idle computers."]
got = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
out["embeddings_default"] = [[float(x) for x in d.embedding] for d in got.data]
out["embedding_tokens"] = got.usage.prompt_tokens
got = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
out["embeddings_float"] = [d.embedding for d in got.data]

# A batch through Files + Batches, as the client's own calls make it.
import io
import time

lines = [
    {"custom_id": f"b{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "all-minilm-l6-v2", "input": t}}
    for i, t in enumerate(texts)
]
upload = client.files.create(
    file=("batch.jsonl", io.BytesIO("\n".join(json.dumps(l) for l in lines).encode())),
    purpose="batch",
)
batch = client.batches.create(
    input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
)
deadline = time.time() + 120
while batch.status not in ("completed", "failed", "cancelled") and time.time() < deadline:
    time.sleep(0.2)
    batch = client.batches.retrieve(batch.id)
out["batch_status"] = batch.status
out["batch_counts"] = [batch.request_counts.completed, batch.request_counts.total]
content = client.files.content(batch.output_file_id).text
out["batch_lines"] = [
    [json.loads(l)["custom_id"], json.loads(l)["response"]["body"]["data"][0]["embedding"]]
    for l in content.splitlines()
]

try:
    client.chat.completions.create(model="no-such-model", messages=question)
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
try:
    openai.OpenAI(base_url=base_url, api_key="sk-wrong-key", max_retries=0).models.list()
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))
