"""Option dicts of the training modules: defaults in one place, misspelt keys refused."""

from __future__ import annotations

from collections.abc import Mapping


def checked_options(name: str, given: Mapping | None, defaults: Mapping) -> dict:
    """``defaults`` updated with ``given``; an unknown key is an error naming the valid ones.

    name: the config path users write (e.g. "model.gan"), quoted in the error.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **given}
