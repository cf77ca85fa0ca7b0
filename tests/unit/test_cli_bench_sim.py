"""Command-line plumbing of `bench`, `simulate` and `serve --record-trace`."""

from __future__ import annotations

import argparse

import pytest

from engine.cli import add_engine_args, add_server_args, engine_config_from_args, main


def test_serve_record_trace_flags_reach_the_server_config():
    p = argparse.ArgumentParser()
    add_server_args(p)
    add_engine_args(p)
    cfg = engine_config_from_args(p.parse_args(["--record-trace", "t.jsonl"]))
    assert (cfg.server.record_trace, cfg.server.record_trace_prompts) == ("t.jsonl", False)
    cfg = engine_config_from_args(p.parse_args(["--record-trace", "t.jsonl",
                                                "--record-trace-prompts"]))
    assert cfg.server.record_trace_prompts


@pytest.mark.parametrize("command", ["bench", "simulate"])
def test_help_is_printed_by_the_subcommands_own_parser(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"fastserve {command}" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-shape", "gpt3-175b", "--gpu", "a100-80gb"], "does not fit"),
    (["--model-shape", "opt-13b", "--gpu", "tpu"], "unknown GPU 'tpu'"),
    (["--model-shape", "opt-13b"], "needs both"),
    (["--workload", "alpaca"], "--profile FILE, or --model-shape"),
])
def test_simulate_explains_a_bad_cluster(argv, message, capsys):
    assert main(["simulate", *argv, "--num-prompts", "4", "--request-rate", "1"]) == 2
    assert message in capsys.readouterr().err
