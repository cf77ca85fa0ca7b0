"""Flag checking for the ``fastserve`` command line: everything a user can get wrong is
refused before anything heavy loads, in one line that names the flag, with exit code 2.

Two layers: argparse ``type=`` functions check each value on its own (ranges, sizes such
as ``512M``, ports), and :func:`check_engine_args` / :func:`check_server_args` check what
needs context (the model's context length, CUDA, a port already taken, policy names and
knobs). Neither imports torch unless a flag names a CUDA device.
"""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class UsageError(Exception):
    """A user mistake in the flags: reported in one line, exit code 2, no traceback."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"argument {flag}: {message}")
        self.flag = flag


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints usage first) and whose
    help shows every default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, also for options without help text (unlike
    ArgumentDefaultsHelpFormatter), and none for switches and required options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "(default" in text:
            return text
        if default is None or default is False or default == argparse.SUPPRESS or default == []:
            return text
        if action.required or isinstance(action, argparse._StoreTrueAction):
            return text
        if not action.option_strings and action.nargs in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:  # argparse skips an empty help
            action.help = self._get_help_string(action) or None
        return super()._format_action(action)


# -- value types ---------------------------------------------------------------------------
_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1048576' -> bytes (binary units)."""
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    scale = 1
    if t and t[-1] in _UNITS:
        t, scale = t[:-1], _UNITS[t[-1]]
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512M, 2G or a number of bytes, got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return int(value * scale)


def format_size(n: int) -> str:
    """Bytes as the shortest exact size string parse_size reads back ('512M', '1G')."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit.lower()]
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """Bytes for people: '1.5 GiB', '512.0 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    check.__name__ = f"int>={minimum}"
    return check


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable:
    def check(text: str) -> float:
        value = _float(text)
        if value < low or (low_open and value == low) or value > high:
            lo = f"> {low}" if low_open else f">= {low}"
            hi = "" if high == math.inf else f" and <= {high}"
            raise argparse.ArgumentTypeError(f"must be {lo}{hi}, got {text}")
        return value

    return check


non_negative_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
fraction = float_in(0.0, 1.0, low_open=True)


def port(text: str) -> int:
    """1..65535, or 0 for any free port (the bound port is printed when ready)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be in 1..65535 (0: any free port), got {value}")
    return value


def positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 bytes, got {text!r}")
    return value


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(
            f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {text!r}")
    return level


# -- checks that need context --------------------------------------------------------------
def check_model(args: argparse.Namespace) -> str:
    """Merge the positional MODEL into ``--model``; the resolved path. Nothing downloads."""
    from engine.models.paths import ModelLoadError, resolve_model_path

    positional = getattr(args, "model_arg", None)
    if positional is not None:
        if args.model is not None and args.model != positional:
            raise UsageError("MODEL", f"given twice: {positional!r} and --model {args.model!r}")
        args.model = positional
    flag = "MODEL" if positional is not None else "--model"
    try:
        return resolve_model_path(args.model)
    except ModelLoadError as e:
        raise UsageError(flag, str(e)) from None


def check_engine_args(args: argparse.Namespace) -> None:
    """Checks for serve/generate/profile that need more than one flag's value."""
    from engine.models.paths import ModelLoadError, model_context_length
    from engine.policies.registry import (
        SCHEDULING_GROUP,
        SWAP_GROUP,
        UnknownPluginError,
        available,
        create_scheduling_policy,
        create_swap_policy,
    )

    path = check_model(args)
    if args.allow_long_context and _learned_positions(path):
        raise UsageError("--allow-long-context", "this model has learned position embeddings "
                                                 "(OPT): it cannot run past its context length")
    if args.max_model_len is not None and not args.allow_long_context:
        try:
            context = model_context_length(path)
        except ModelLoadError as e:
            raise UsageError("--model", str(e)) from None
        if args.max_model_len > context:
            raise UsageError("--max-model-len", (
                f"{args.max_model_len} is above the model's context length ({context}); "
                "pass --allow-long-context to use it anyway"))
    check_device(args.device)
    if args.profile_path is not None:
        from engine.policies.profile import PrefillProfile

        try:
            PrefillProfile.load(args.profile_path)
        except (OSError, ValueError) as e:
            raise UsageError("--profile", f"cannot use {args.profile_path!r}: {e}") from None
    for flag, group, name, options, create in (
        ("--scheduling-policy", SCHEDULING_GROUP, args.scheduling_policy, args.policy_option,
         create_scheduling_policy),
        ("--swap-policy", SWAP_GROUP, args.swap_policy, args.swap_policy_option,
         create_swap_policy),
    ):
        names = available(group)
        if name not in names:
            raise UsageError(flag, f"no policy named {name!r}; installed: {', '.join(names)}")
        try:  # the knobs too: a plugin checks its options in its constructor
            create(name, dict(options))
        except (UnknownPluginError, ValueError, TypeError) as e:
            option_flag = "--policy-option" if group == SCHEDULING_GROUP else "--swap-policy-option"
            raise UsageError(option_flag, str(e)) from None


def _learned_positions(path: str) -> bool:
    import json
    import os

    if not os.path.isdir(path):
        return False  # GGUF: llama and qwen2 only, both RoPE
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") == "opt"
    except (OSError, ValueError):
        return False  # the loader reports an unreadable config later, with its own message


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError("--device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    import torch  # only now: a CUDA device was asked for

    if not torch.cuda.is_available():
        raise UsageError("--device", f"{device} was asked for, but CUDA is not available "
                                     f"(torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise UsageError("--device", f"{device}: this machine has {count} CUDA device(s)")


def check_port_free(host: str, port_number: int) -> None:
    """Refuse a port something already listens on (before the model loads, not after)."""
    if port_number == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError("--host", f"cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        # As the server itself binds: a port in TIME_WAIT is reusable, a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            why = ("is already in use" if e.errno == errno.EADDRINUSE
                   else f"cannot be bound: {e.strerror}")
            raise UsageError("--port", f"{host}:{port_number} {why}") from None


def check_server_args(args: argparse.Namespace) -> None:
    if getattr(args, "api_key_file", None):
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                empty = not f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError("--api-key-file", f"cannot read {args.api_key_file!r}: {e}") from None
        if empty:
            raise UsageError("--api-key-file", f"{args.api_key_file!r} is empty")
    check_port_free(args.host, args.port)


def fail(prog: str, error: BaseException, stream: Any = None) -> int:
    """Print a user mistake as one line; the exit code for it."""
    message = " ".join(str(error).split())  # one line, whatever the message held
    print(f"{prog}: error: {message}", file=stream or sys.stderr)
    return 2
