"""The OpenAI-compatible API over a local swarm of the default model, driven by the real `openai`
package: completions, chat, streaming, errors, the API key, concurrent requests, and fine-tuning
jobs (one run to completion, one cancelled, both still listed after an API restart)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.models import resolve_model

from tests.conftest import stop_group

pytestmark = pytest.mark.timeout(600)

KEY = "test-key-123"


class Api:
    def __init__(self, swarm, folder: Path, *extra: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"api-{self.port}.log"
        command = [
            sys.executable, "-m", "swarm.api", "--initial-peers", *swarm.initial_peers, "--port", str(self.port),
            "--api-key", KEY, "--jobs-dir", str(folder / "jobs"), "--data-root", str(folder), *extra,
        ]
        self.process = subprocess.Popen(command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=swarm.env, start_new_session=True)
        deadline = time.monotonic() + 120
        while self.request("GET", "/health")[0] != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def request(self, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def close(self) -> None:
        stop_group(self.process)


@pytest.fixture(scope="module")
def api(smollm2_swarm, tmp_path_factory):
    server = Api(smollm2_swarm, tmp_path_factory.mktemp("api"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference():
    folder = resolve_model("smollm2-135m").path
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _greedy(reference, ids: torch.Tensor, tokens: int) -> str:
    tokenizer, model = reference
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_completions_equal_transformers(api, reference):
    prompt = "The capital of France is"
    reply = api.client().completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0)
    tokenizer, _ = reference
    assert reply.choices[0].text == _greedy(reference, tokenizer(prompt, return_tensors="pt").input_ids, 12)
    assert reply.usage.prompt_tokens == len(tokenizer(prompt).input_ids) and reply.usage.completion_tokens == 12
    assert reply.choices[0].finish_reason == "length"
    assert [model.id for model in api.client().models.list().data] == ["smollm2-135m"]


def test_chat_uses_the_template_and_streams(api, reference):
    tokenizer, _ = reference
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]
    reply = api.client().chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=10, temperature=0)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    expected = _greedy(reference, ids, 10)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected
    pieces = []
    for chunk in api.client().chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=10, temperature=0, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == expected and len([piece for piece in pieces if piece]) > 1  # several pieces, as they came


def test_stop_seed_and_n(api):
    client = api.client()
    stopped = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"])
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=5)
               for _ in range(2)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # same seed, same text
    several = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=5, n=3)
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert several.choices[0].text == sampled[0].choices[0].text  # choice k uses seed + k


def test_errors_and_the_api_key(api):
    with pytest.raises(openai.AuthenticationError):
        api.client(key="wrong").completions.create(model="smollm2-135m", prompt="hi", max_tokens=2)
    assert api.request("GET", "/v1/models", key=None)[0] == 401
    assert api.request("GET", "/health", key=None)[0] == 200
    with pytest.raises(openai.BadRequestError) as bad:
        api.client().completions.create(model="smollm2-135m", prompt="hi", max_tokens=-3)
    assert "max_tokens" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        api.client().completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    status, body = api.request("POST", "/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "role" in body["error"]["message"]
    status, body = api.request("POST", "/chat", {"prompt": "", "max_tokens": 4})
    assert status == 400 and "prompt" in body["error"]["message"]
    status, body = api.request("POST", "/chat", {"prompt": "The capital of France is", "max_tokens": 4})
    assert status == 200 and body["completion_tokens"] == 4 and body["text"]


def test_concurrent_requests_equal_sequential_ones(api):
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The first planet is", "My favourite food"]
    client = api.client()

    def complete(prompt: str) -> str:
        return client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    sequential = [complete(prompt) for prompt in prompts]
    before = api.request("GET", "/health")[1]["batching"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        concurrent_ = list(pool.map(complete, prompts))
    assert concurrent_ == sequential
    after = api.request("GET", "/health")[1]["batching"]
    assert after["rows"] - before["rows"] > after["steps"] - before["steps"]  # steps carried several requests


def test_requests_alone_without_batching(smollm2_swarm, reference, tmp_path):
    alone = Api(smollm2_swarm, tmp_path, "--max-batch", "1")
    try:
        tokenizer, _ = reference
        prompt = "Water boils at"
        reply = alone.client().completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0)
        assert reply.choices[0].text == _greedy(reference, tokenizer(prompt, return_tensors="pt").input_ids, 8)
        assert alone.request("GET", "/health")[1]["batching"] == {"steps": 0, "rows": 0}
    finally:
        alone.close()


CODE_PROMPT = "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons. Again: apples, pears,"


def test_speculative_requests_run_alone_and_give_greedy_text(api, reference):
    tokenizer, _ = reference
    expected = _greedy(reference, tokenizer(CODE_PROMPT, return_tensors="pt").input_ids, 16)
    before = api.request("GET", "/health")[1]["batching"]
    reply = api.client().completions.create(
        model="smollm2-135m", prompt=CODE_PROMPT, max_tokens=16, temperature=0, extra_body={"speculation": "prompt_lookup", "speculative_tokens": 8},
    )
    assert reply.choices[0].text == expected and reply.usage.completion_tokens == 16
    pieces = [chunk.choices[0].text for chunk in api.client().completions.create(
        model="smollm2-135m", prompt=CODE_PROMPT, max_tokens=16, temperature=0, stream=True, extra_body={"speculation": "prompt_lookup"},
    )]
    assert "".join(pieces) == expected
    assert api.request("GET", "/health")[1]["batching"] == before  # outside the batch
    status, body = api.request("POST", "/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "speculation": "draft"})
    assert status == 400 and "--draft-model" in body["error"]["message"]
    status, body = api.request("POST", "/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "speculation": "guess"})
    assert status == 400 and "speculation" in body["error"]["message"]


def test_server_default_speculation_and_a_draft_model(smollm2_swarm, reference, tmp_path):
    server = Api(smollm2_swarm, tmp_path, "--speculation", "prompt_lookup", "--draft-model", "smollm2-135m")
    try:
        tokenizer, _ = reference
        expected = _greedy(reference, tokenizer(CODE_PROMPT, return_tensors="pt").input_ids, 12)
        client = server.client()
        for extra in ({}, {"speculation": "draft", "speculative_tokens": 6}):
            reply = client.completions.create(model="smollm2-135m", prompt=CODE_PROMPT, max_tokens=12, temperature=0, extra_body=extra)
            assert reply.choices[0].text == expected
        assert server.request("GET", "/health")[1]["batching"] == {"steps": 0, "rows": 0}
        reply = client.completions.create(model="smollm2-135m", prompt=CODE_PROMPT, max_tokens=12, temperature=0, extra_body={"speculation": "none"})
        assert reply.choices[0].text == expected and server.request("GET", "/health")[1]["batching"]["steps"] > 0
        status, body = server.request("POST", "/chat", {"prompt": CODE_PROMPT, "max_tokens": 12, "speculation": "draft"})
        assert status == 200 and body["text"] == expected
    finally:
        server.close()


def test_fine_tune_jobs_run_cancel_and_survive_a_restart(api, smollm2_swarm, tmp_path_factory):
    folder = Path(api.log).parent
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": f"In the beginning was the verse number {k}."}) + "\n" for k in range(4)))
    status, job = api.request("POST", "/fine-tune", {
        "dataset_path": "tiny.jsonl", "output_path": "out-done",
        "hyperparameters": {"lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "num_epochs": 1, "batch_size": 2, "max_seq_length": 16},
    })
    assert status == 201 and job["status"] == "running" and job["total_steps"] == 2, job
    status, long_job = api.request("POST", "/fine-tune", {
        "dataset_path": "tiny.jsonl", "output_path": "out-cancelled", "hyperparameters": {"num_epochs": 500, "batch_size": 1},
    })
    assert status == 201
    for bad in ({"dataset_path": "/etc/passwd", "output_path": "x"}, {"dataset_path": "missing.jsonl", "output_path": "x"},
                {"dataset_path": "tiny.jsonl", "output_path": "x", "hyperparameters": {"lora_r": 0}}):
        assert api.request("POST", "/fine-tune", bad)[0] == 400, bad

    deadline = time.monotonic() + 300
    while (state := api.request("GET", f"/jobs/{job['id']}")[1])["status"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(1)
    assert state["status"] == "succeeded" and state["progress"] == 1.0 and state["steps_done"] == 2 and state["loss"] > 0, state
    assert (folder / "out-done" / "adapter_model.safetensors").exists()

    while api.request("GET", f"/jobs/{long_job['id']}")[1]["steps_done"] < 1:  # it is training
        assert time.monotonic() < deadline
        time.sleep(1)
    status, cancelled = api.request("DELETE", f"/jobs/{long_job['id']}")
    assert status == 200 and cancelled["status"] == "cancelled"
    from swarm.api.jobs import group_alive

    assert not group_alive(cancelled["pid"])  # the trainer and its children are gone

    api.close()  # a new API process finds the jobs where the old one left them
    again = Api(smollm2_swarm, folder)
    try:
        listed = {item["id"]: item["status"] for item in again.request("GET", "/jobs")[1]["data"]}
        assert listed == {job["id"]: "succeeded", long_job["id"]: "cancelled"}
        assert again.request("GET", "/jobs/ftjob-nope")[0] == 404
    finally:
        again.close()
