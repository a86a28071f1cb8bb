"""Drives gpt2-server's OpenAI-compatible routes with the official `openai` package (and
`requests` for the raw error bodies). Run by bins/gpt2-server/tests/openai.rs:

    python openai_client.py BASE_URL MODEL_ID

The demo model is random: this checks structure and determinism, not the text's quality.
"""

import sys

import openai
import requests
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
checks = 0


def check(condition, message):
    global checks
    checks += 1
    if not condition:
        raise AssertionError(message)


# Models.
models = client.models.list()
ids = [m.id for m in models.data]
check(ids == [model], f"models.list: {ids}")
retrieved = client.models.retrieve(model)
check(retrieved.id == model and retrieved.object == "model", f"retrieve: {retrieved}")
check(retrieved.owned_by == "gpt2-rs", retrieved)
check(retrieved.model_extra.get("max_model_len") == 1024, retrieved)
try:
    client.models.retrieve("not-" + model)
    check(False, "retrieving another model succeeds")
except openai.NotFoundError as e:
    check(e.body["code"] == "model_not_found", e.body)

# A plain completion.
c = client.completions.create(model=model, prompt="Hello, my name is", max_tokens=8, seed=1)
check(c.object == "text_completion" and c.id.startswith("cmpl-"), c)
check(c.model == model and isinstance(c.created, int), c)
check(len(c.choices) == 1 and c.choices[0].index == 0, c)
check(c.choices[0].finish_reason in ("stop", "length"), c)
check(c.choices[0].logprobs is None, c)
check(c.usage.prompt_tokens == 5, c.usage)
check(0 < c.usage.completion_tokens <= 8, c.usage)
check(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, c.usage)
# max_tokens defaults to 16.
d = client.completions.create(model=model, prompt="Hello", extra_body={"ignore_eos": True})
check(d.usage.completion_tokens == 16 and d.choices[0].finish_reason == "length", d)

# n = 3.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=3, seed=7)
check([ch.index for ch in c.choices] == [0, 1, 2], c)
check(len({ch.text for ch in c.choices}) > 1, f"n=3 gave identical samples: {c}")

# Same seed, same text; another seed, (very likely) another text.
a = client.completions.create(model=model, prompt="The weather", max_tokens=10, seed=42)
b = client.completions.create(model=model, prompt="The weather", max_tokens=10, seed=42)
o = client.completions.create(model=model, prompt="The weather", max_tokens=10, seed=43)
check(a.choices[0].text == b.choices[0].text, (a, b))
check(a.choices[0].text != o.choices[0].text, (a, o))

# Temperature 0 is greedy, and equals the native greedy continuation.
g = client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0)
g2 = client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0, seed=5)
check(g.choices[0].text == g2.choices[0].text, (g, g2))
native = requests.post(
    f"{base}/invocations",
    json={"input": "Hello world", "mode": "greedy", "max_new_tokens": 6, "num_return_sequences": 1},
    timeout=120,
).json()
check(native == ["Hello world" + g.choices[0].text], (native, g))

# Stop strings: the text never contains them, and the reason is "stop". The stop string is a
# piece of what the same seed generates without it, so it is found.
full = client.completions.create(model=model, prompt="A", max_tokens=12, seed=3).choices[0].text
stop = full[len(full) // 2 :][:2] if len(full) >= 4 else full
s = client.completions.create(model=model, prompt="A", max_tokens=12, seed=3, stop=[stop])
check(stop not in s.choices[0].text, (stop, s))
check(s.choices[0].finish_reason == "stop", (stop, full, s))
check(full.startswith(s.choices[0].text), (full, s))

# logprobs = 3.
c = client.completions.create(model=model, prompt="I think", max_tokens=5, logprobs=3, seed=2)
lp = c.choices[0].logprobs
count = len(lp.tokens)
check(count == c.usage.completion_tokens, (lp, c.usage))
check(len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == count, lp)
check(all(x <= 0 for x in lp.token_logprobs), lp.token_logprobs)
check(all(isinstance(t, dict) and 1 <= len(t) <= 3 for t in lp.top_logprobs), lp.top_logprobs)
check(all(v <= 0 for t in lp.top_logprobs for v in t.values()), lp.top_logprobs)
check(lp.text_offset[0] == 0, lp.text_offset)
for i in range(1, count):
    check(lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1]), lp)

# echo, then echo with logprobs: the prompt's tokens first, the first one unscored.
e = client.completions.create(model=model, prompt="Echo this", max_tokens=3, echo=True, seed=4)
check(e.choices[0].text.startswith("Echo this"), e)
e = client.completions.create(model=model, prompt="Echo this", max_tokens=3, echo=True, logprobs=2, seed=4)
lp = e.choices[0].logprobs
p = e.usage.prompt_tokens
check("".join(lp.tokens[:p]) == "Echo this", lp.tokens)
check(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp)
check(all(x <= 0 for x in lp.token_logprobs[1:]), lp)
check(len(lp.tokens) == p + e.usage.completion_tokens, (lp, e.usage))
check(lp.text_offset[0] == 0 and lp.text_offset[p] == len("Echo this"), lp)
for i in range(1, len(lp.tokens)):
    check(lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1]), lp)

# Token-id prompts: [int] and [[int], [int]] (choices numbered prompt * n + i).
t = client.completions.create(model=model, prompt=[15496, 11], max_tokens=3, temperature=0, echo=True)
check(t.choices[0].text.startswith("Hello,") and t.usage.prompt_tokens == 2, t)
t = client.completions.create(model=model, prompt=[[15496], [15496, 11]], max_tokens=3, n=2, seed=9)
check([ch.index for ch in t.choices] == [0, 1, 2, 3], t)
check(t.usage.prompt_tokens == 3, t.usage)
t = client.completions.create(model=model, prompt=["Hello", "Hello"], max_tokens=4, temperature=0)
check(t.choices[0].text == t.choices[1].text and len(t.choices) == 2, t)

# Streaming: the deltas add up to the plain answer with the same seed.
plain = client.completions.create(model=model, prompt="Stream me", max_tokens=8, seed=11)
chunks = list(client.completions.create(model=model, prompt="Stream me", max_tokens=8, seed=11, stream=True))
check(len(chunks) >= 2, chunks)
check(all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks), chunks)
text = "".join(ch.choices[0].text for ch in chunks)
check(text == plain.choices[0].text, (text, plain))
check(all(ch.choices[0].finish_reason is None for ch in chunks[:-1]), chunks)
check(chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason, chunks[-1])
check(all(ch.usage is None for ch in chunks), chunks)

# stream_options.include_usage: the last chunk has no choices and the usage; then the stream ends.
chunks = list(client.completions.create(
    model=model, prompt="Count", max_tokens=5, n=2, stream=True, echo=True, logprobs=1,
    stream_options={"include_usage": True}, seed=12))
last = chunks[-1]
check(last.choices == [] and last.usage is not None, last)
check(last.usage.prompt_tokens == 1 and last.usage.completion_tokens <= 10, last.usage)
by_choice = {0: "", 1: ""}
for ch in chunks[:-1]:
    check(len(ch.choices) == 1, ch)
    by_choice[ch.choices[0].index] += ch.choices[0].text
check(all(v.startswith("Count") for v in by_choice.values()), by_choice)
ends = [ch.choices[0].finish_reason for ch in chunks[:-1] if ch.choices[0].finish_reason]
check(len(ends) == 2, chunks)

# Errors the client raises as its own types, with the param named.
def bad_request(param, **kwargs):
    try:
        client.completions.create(model=model, prompt="Hi", **kwargs)
    except openai.BadRequestError as e:
        check(e.body["param"] == param and e.body["type"] == "invalid_request_error", e.body)
        return e
    check(False, f"{kwargs} was accepted")

bad_request("temperature", temperature=-1)
bad_request("temperature", temperature=2.5)
bad_request("max_tokens", max_tokens=5000)
bad_request("top_p", top_p=0)
bad_request("n", n=1000)
bad_request("logprobs", logprobs=6)
bad_request("best_of", best_of=3)
bad_request("suffix", suffix="after")
bad_request("stop", stop=["a", "b", "c", "d", "e"])
bad_request("presence_penalty", presence_penalty=3)
bad_request("logit_bias", logit_bias={"99999999": 1})
bad_request("prompt", extra_body={"prompt": [99999999]})
try:
    client.completions.create(model="not-" + model, prompt="Hi")
    check(False, "another model is accepted")
except openai.NotFoundError as e:
    check(e.body["code"] == "model_not_found" and e.body["param"] == "model", e.body)
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    check(False, "chat is accepted")
except openai.BadRequestError as e:
    check("/v1/completions" in e.body["message"], e.body)

# The raw error bodies have exactly OpenAI's shape.
def raw(path, body, status, data=None):
    r = requests.post(f"{base}{path}", json=body, timeout=60) if data is None else requests.post(
        f"{base}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    check(r.status_code == status, (path, body, r.status_code, r.text))
    check(r.headers["content-type"] == "application/json", r.headers)
    j = r.json()
    check(list(j) == ["error"], j)
    check(sorted(j["error"]) == ["code", "message", "param", "type"], j)
    check(isinstance(j["error"]["message"], str) and j["error"]["message"], j)
    return j["error"]

check(raw("/v1/completions", {"model": model, "prompt": "Hi", "temperature": "hot"}, 400)["param"] == "temperature", "type")
check(raw("/v1/completions", {"prompt": "Hi"}, 400)["param"] == "model", "missing model")
check(raw("/v1/completions", {"model": model}, 400)["param"] == "prompt", "missing prompt")
check(raw("/v1/completions", {"model": "nope", "prompt": "Hi"}, 404)["code"] == "model_not_found", "404")
check(raw("/v1/completions", None, 400, data=b"{not json")["param"] is None, "malformed")
check(raw("/v1/completions", None, 400, data=b"[1]")["type"] == "invalid_request_error", "array body")
check(raw("/v1/chat/completions", {"model": model, "messages": []}, 400)["type"] == "invalid_request_error", "chat")
r = requests.get(f"{base}/v1/models/nope", timeout=60)
check(r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text)

print(f"openai client: {checks} checks passed")
