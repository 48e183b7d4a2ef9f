#!/usr/bin/env python3
"""End-to-end test: the official `openai` Python SDK and LangChain (`langchain-openai`) talking to azure-proxy in
front of two mock instances.

Usage: python tests/e2e/openai_sdk_test.py   (needs `pip install openai langchain-openai`)

Binaries come from AZURE_PROXY_BIN and MOCK_AZURE_BIN (default: target/debug/azure-proxy and
target/debug/examples/mock_azure; build them with `cargo build --bin azure-proxy --example mock_azure`).
Prints `N passed, 0 failed` and exits 0 when everything passes, exits 1 otherwise.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
PROXY_BIN = os.environ.get("AZURE_PROXY_BIN", str(ROOT / "target/debug/azure-proxy"))
MOCK_BIN = os.environ.get("MOCK_AZURE_BIN", str(ROOT / "target/debug/examples/mock_azure"))

CLIENT_KEY = "e2e-client-key"
LIMITED_KEY = "e2e-limited-key"  # a named key allowed one request per minute
API_VERSION = "2024-06-01"
EVENT_DELAY_S = 0.2  # the mocks' pause between two SSE events
INSTANCES = [("east", "east-secret"), ("west", "west-secret")]
MESSAGES = [{"role": "user", "content": "Say hello"}]
STARTUP_DEADLINE_S = 15


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc, log_path, needle, deadline_s=STARTUP_DEADLINE_S):
    """Waits until `needle` appears in the process's log file; fails if the process exits or time runs out."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if needle in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{needle!r} not seen in {log_path} (exit code {proc.poll()}):\n{log_path.read_text()}")


class Setup:
    """Two mock instances and the proxy in front of them, as child processes."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.procs = []

    def spawn(self, name, args, ready_line):
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_for_line(proc, log_path, ready_line)

    def start(self):
        instances = []
        for name, key in INSTANCES:
            port = free_port()
            delay_ms = str(int(EVENT_DELAY_S * 1000))
            args = [MOCK_BIN, "--listen", f"127.0.0.1:{port}", "--key", key, "--name", name, "--event-delay-ms", delay_ms]
            self.spawn(f"mock-{name}", args, f"mock_azure {name} listening on")
            instances.append({"endpoint": f"http://127.0.0.1:{port}", "api_key": key, "name": name})

        config = self.workdir / "azure_instances.json"
        client_keys = [CLIENT_KEY, {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 1}]
        config.write_text(json.dumps({"instances": instances, "client_keys": client_keys}, indent=2))
        self.port = free_port()
        args = [PROXY_BIN, "--config", str(config), "--listen", f"127.0.0.1:{self.port}", "--workers", "8"]
        self.spawn("proxy", args, f"listening on 127.0.0.1:{self.port}")

    def stop(self):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()

    def client(self, api_key=CLIENT_KEY):
        return openai.AzureOpenAI(
            azure_endpoint=f"http://127.0.0.1:{self.port}",
            api_key=api_key,
            api_version=API_VERSION,
            max_retries=0,  # a retry would hide what the proxy answered
            timeout=30,
        )

    def v1_client(self, api_key=CLIENT_KEY):
        """The plain `OpenAI` client on Azure's v1 API: it sends its key as `Authorization: Bearer`."""
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/openai/v1/",
            api_key=api_key,
            max_retries=0,
            timeout=30,
        )


def test_plain_completion_round_robin(env):
    client = env.client()
    served_by = set()
    for _ in range(2):
        completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        content = completion.choices[0].message.content
        assert content.startswith("Hello from "), content
        served_by.add(content[len("Hello from ") :])
    assert served_by == {"east", "west"}, f"two consecutive calls should reach both instances, got {served_by}"


def test_streamed_completion_is_live(env):
    client = env.client()
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    pieces, arrivals, first_content_at = [], [], None
    for chunk in stream:
        now = time.monotonic()
        arrivals.append(now)
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            pieces.append(content)
            if first_content_at is None:
                first_content_at = now
    text = "".join(pieces)
    assert text in ("Hello from east", "Hello from west"), repr(text)
    assert first_content_at is not None
    # The mock sends role, "Hello", " from", " NAME", finish, [DONE] with a pause between each two events, so
    # three pauses separate the first content chunk from the last chunk. If the proxy buffered the stream
    # they would all arrive together; 0.15 s per pause leaves room for scheduling jitter.
    spread = arrivals[-1] - first_content_at
    assert spread >= 3 * 0.15, f"events arrived together (spread {spread:.3f}s): the stream was buffered"


def test_v1_api_with_the_plain_openai_client(env):
    client = env.v1_client()
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content.startswith("Hello from "), completion.choices[0].message.content
    pieces = []
    for chunk in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) in ("Hello from east", "Hello from west"), repr("".join(pieces))


def test_langchain_chat_openai_on_v1_and_azure_chat_openai(env):
    from langchain_openai import AzureChatOpenAI, ChatOpenAI

    base = f"http://127.0.0.1:{env.port}"
    v1 = ChatOpenAI(base_url=f"{base}/openai/v1/", api_key=CLIENT_KEY, model="gpt-4o", max_retries=0, timeout=30)
    azure = AzureChatOpenAI(
        azure_endpoint=base,
        api_key=CLIENT_KEY,
        api_version=API_VERSION,
        azure_deployment="gpt-4o",
        max_retries=0,
        timeout=30,
    )
    for llm in (v1, azure):
        answer = llm.invoke("Say hello").content
        assert answer in ("Hello from east", "Hello from west"), repr(answer)
        streamed = "".join(chunk.content for chunk in llm.stream("Say hello"))
        assert streamed in ("Hello from east", "Hello from west"), repr(streamed)


def test_a_key_over_its_rate_limit_gets_the_proxys_429(env):
    client = env.v1_client(api_key=LIMITED_KEY)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.RateLimitError as e:
        assert e.code == "client_requests_per_minute_exceeded", e.code
        assert int(e.response.headers["retry-after"]) >= 1, e.response.headers
    else:
        raise AssertionError("a second request within the minute was served")


def test_wrong_client_key_is_rejected(env):
    client = env.client(api_key="not-a-valid-key")
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e.status_code
    else:
        raise AssertionError("a wrong client key was accepted")


def test_request_id_header(env):
    client = env.client()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers.get("x-request-id"), f"no x-request-id in {dict(raw.headers)}"
    assert raw.parse().choices[0].message.content.startswith("Hello from ")

    # A sane client-supplied ID is kept and echoed back.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"x-request-id": "e2e-req-42"}
    )
    assert raw.headers.get("x-request-id") == "e2e-req-42", raw.headers.get("x-request-id")


TESTS = [
    test_plain_completion_round_robin,
    test_streamed_completion_is_live,
    test_request_id_header,
    test_v1_api_with_the_plain_openai_client,
    test_langchain_chat_openai_on_v1_and_azure_chat_openai,
    test_a_key_over_its_rate_limit_gets_the_proxys_429,
    test_wrong_client_key_is_rejected,  # last: bad keys count towards the proxy's blocking of a client
]


def main():
    for path in (PROXY_BIN, MOCK_BIN):
        if not os.access(path, os.X_OK):
            print(f"missing binary {path} (cargo build --bin azure-proxy --example mock_azure)", file=sys.stderr)
            return 1
    passed, failed = 0, []
    with tempfile.TemporaryDirectory(prefix="azure-proxy-e2e-") as workdir:
        env = Setup(workdir)
        try:
            env.start()
            for test in TESTS:
                try:
                    test(env)
                    passed += 1
                    print(f"ok   {test.__name__}")
                except Exception:
                    failed.append(test.__name__)
                    print(f"FAIL {test.__name__}\n{traceback.format_exc()}")
        except Exception:
            failed.append("setup")
            print(f"FAIL setup\n{traceback.format_exc()}")
        finally:
            env.stop()
            if failed:
                proxy_log = Path(workdir) / "proxy.log"
                if proxy_log.exists():
                    print(f"--- proxy log ---\n{proxy_log.read_text(errors='replace')}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
