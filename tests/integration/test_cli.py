"""The ``fastserve`` command line as a user meets it: every mistake is refused at once, in
one line naming the flag, with exit code 2, before anything loads and leaving nothing
behind; ``--help`` shows the defaults. Each case is a real subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

TIMEOUT_S = 60


def fastserve(*args: str, tmp: str) -> subprocess.CompletedProcess:
    # TMPDIR: where a worker's socket directory would go, so the test can see it is empty.
    env = {**os.environ, "TMPDIR": tmp, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False, env=env)


REFUSED = [
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "-1"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["serve", "--block-size", "0"], "--block-size"),
    (["serve", "--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["serve", "--kv-cache-memory", "512Q"], "--kv-cache-memory"),
    (["serve", "--host-kv-cache-memory", "-1G"], "--host-kv-cache-memory"),
    (["serve", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["serve", "--num-gpu-blocks", "0"], "--num-gpu-blocks"),
    (["serve", "--max-model-len", "0"], "--max-model-len"),
    (["serve", "--max-model-len", "1000000"], "--max-model-len"),
    (["serve", "--torch-threads", "0"], "--torch-threads"),
    (["serve", "--max-body-bytes", "0"], "--max-body-bytes"),
    (["serve", "--log-level", "LOUD"], "--log-level"),
    (["serve", "--log-format", "xml"], "--log-format"),
    (["serve", "--device", "tpu"], "--device"),
    (["serve", "--scheduling-policy", "no-such-policy"], "--scheduling-policy"),
    (["serve", "--swap-policy", "no-such-policy"], "--swap-policy"),
    (["serve", "--tool-call-parser", "no-such-parser"], "--tool-call-parser"),
    (["serve", "--scheduling-policy", "mlfq", "--policy-option", "base_quantum_s=-1"],
     "--policy-option"),
    (["serve", "--profile", "/no/such/profile.json"], "--profile"),
    (["serve", "--model", "/no/such/model.gguf"], "--model"),
    (["serve", "/no/such/dir", "--model", "/other"], "MODEL"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["profile", "--block-size", "-4"], "--block-size"),
]


@pytest.mark.parametrize(("args", "flag"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_flag_is_refused_in_one_line_with_exit_2(tmp_path, args, flag):
    out = fastserve(*args, tmp=str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert flag in lines[0] and "error" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert os.listdir(tmp_path) == []  # no socket directory, nothing else


def test_port_in_use_is_refused_before_the_model_loads(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = fastserve("serve", "--port", str(port), tmp=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"fastserve serve: error: argument --port: 127.0.0.1:{port} is already in use"]
    assert os.listdir(tmp_path) == []


def test_hub_id_gets_a_hint_and_nothing_is_downloaded(tmp_path):
    out = fastserve("serve", "HuggingFaceTB/SmolLM2-135M-Instruct", tmp=str(tmp_path))
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "argument MODEL" in line and "hub id" in line and "never downloads" in line
    assert os.listdir(tmp_path) == []


def test_cuda_device_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen here")
    out = fastserve("serve", "--device", "cuda", tmp=str(tmp_path))
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "argument --device" in line and "CUDA is not available" in line


def test_serve_help_shows_every_default_and_the_installed_policies(tmp_path):
    out = fastserve("serve", "--help", tmp=str(tmp_path))
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for default in ("(default: 8000)", "(default: 127.0.0.1)", "(default: 16)",
                    "(default: 512M)", "(default: 1G)", "(default: 0.85)", "(default: 64)",
                    "(default: 2048)", "(default: 4M)", "(default: INFO)", "(default: text)",
                    "(default: auto)"):
        assert default in text, default
    for policy in ("fcfs", "mlfq", "skip-join-mlfq", "priority", "proactive", "reactive",
                   "recompute"):
        assert policy in text


def test_version_and_worker_help(tmp_path):
    version = fastserve("--version", tmp=str(tmp_path))
    assert version.returncode == 0 and version.stdout.startswith("fastserve ")
    worker = fastserve("worker", "--help", tmp=str(tmp_path))
    assert worker.returncode == 0 and "usage: fastserve worker" in worker.stdout
