"""Typed settings of the training modules: one dataclass holds each block's keys and defaults.

Each block a module takes (``model.flow``, ``model.loss``, ``optim``, ...) is a dataclass next
to the code that uses it. It serves twice:

- Hydra: ``vidgen.run.register_configs`` stores every one in Hydra's ConfigStore as
  ``schema/<name>`` and the model YAMLs put them in their defaults lists, so the composed
  config holds every default (``python train.py ... --cfg job`` shows them), the YAML files
  only override, and a misspelt or wrongly typed override fails at compose time naming it.
- Construction: ``typed_options`` checks the dict a module is given (from Hydra, or by hand
  in a notebook) against the same dataclass, so a module built without Hydra is held to the
  same keys and types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, fields, is_dataclass
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def typed_options(name: str, given: Mapping | T | None, cls: type[T]) -> T:
    """``cls`` with the values of ``given`` (a mapping, or a ``cls`` already): an unknown key is
    an error naming the valid ones, a value of the wrong type an error naming the key.

    name: the config path users write (e.g. "model.gan"), quoted in the errors. Values are
    converted as OmegaConf converts them (an int for a float field, "2" for an int one);
    ``cls.__post_init__`` checks what a type cannot (a value among a few, a range).
    """
    if isinstance(given, cls):
        return given
    given = dict(given or {})
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; valid: {sorted(valid)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), given))
    except OmegaConfBaseException as exn:
        reason = str(exn).splitlines()[0]
        raise ValueError(f"{name}.{exn.full_key}={_value_at(given, exn.full_key)!r}: {reason}") from None


def _value_at(given: Mapping, full_key: str | None):
    """The value at an OmegaConf key path ("betas[1]", "gan.weights.b") in ``given``: the bad
    element itself, not the list or dict that holds it."""
    value = given
    for part in re.findall(r"[^.\[\]]+", str(full_key or "")):
        try:
            value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return "?"
    return value


def as_dict(options) -> dict:
    """A typed options dataclass as a plain dict (for checkpoints, JSON and ``**kwargs``)."""
    return asdict(options) if is_dataclass(options) else dict(options)
