"""FastServe: iteration-level preemptive LLM serving."""


def version() -> str:
    """The installed distribution's version ("unknown" when run from a bare checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("fastserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
