"""Plugin discovery: policies are found through entry points, built-ins included."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

SCHEDULING_GROUP = "fastserve.scheduling_policies"
SWAP_GROUP = "fastserve.swap_policies"


class UnknownPluginError(ValueError):
    pass


def available(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=group)})


def load_class(group: str, name: str) -> type:
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        raise UnknownPluginError(
            f"no plugin named {name!r} in {group}; available: {', '.join(available(group)) or 'none'}"
        )
    return matches[0].load()


def create(group: str, name: str, options: dict[str, Any] | None = None) -> Any:
    cls = load_class(group, name)
    try:
        return cls(**(options or {}))
    except TypeError as e:
        raise UnknownPluginError(f"bad options for {group}:{name}: {e}") from e


def create_scheduling_policy(name: str, options: dict[str, Any] | None = None) -> Any:
    return create(SCHEDULING_GROUP, name, options)


def create_swap_policy(name: str, options: dict[str, Any] | None = None) -> Any:
    return create(SWAP_GROUP, name, options)


def wants_profile(policy: Any) -> bool:
    """Whether ``policy`` takes a cost profile (``set_profile``) and was given none in its
    options: the engine then hands it the stored or freshly measured one (skip-join)."""
    return hasattr(policy, "set_profile") and getattr(policy, "profile", None) is None


def bind_memory(policy: Any, blocks: Any) -> None:
    """Hand ``blocks`` (the block manager) to a policy that asks for it (``bind_memory``:
    Orca-style reservation); other policies never see the pools."""
    bind = getattr(policy, "bind_memory", None)
    if bind is not None:
        bind(blocks)
