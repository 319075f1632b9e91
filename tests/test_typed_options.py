"""vidgen.utils.config.typed_options: a settings dataclass checks the dict a module is given."""

from dataclasses import dataclass, field

import pytest

from vidgen.diffusion import FlowOptions
from vidgen.diffusion.generate import sampling_shift
from vidgen.utils.config import as_dict, typed_options


@dataclass
class Knobs:
    rate: float = 0.5
    count: int = 3
    name: str | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    on: bool = False

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"knobs.count={self.count}; it must be >= 1")


def test_defaults_fill_what_is_not_given_and_values_are_converted_to_the_field_type():
    k = typed_options("knobs", {"rate": 2, "sizes": [4]}, Knobs)
    assert k == Knobs(rate=2.0, count=3, name=None, sizes=[4], on=False)
    assert isinstance(k.rate, float)
    assert typed_options("knobs", None, Knobs) == Knobs()
    assert typed_options("knobs", k, Knobs) is k  # already typed: as is
    assert as_dict(k) == {"rate": 2.0, "count": 3, "name": None, "sizes": [4], "on": False}


@pytest.mark.parametrize("given, message", [
    ({"rte": 1.0}, r"knobs has unknown keys \['rte'\]; valid: \['count', 'name', 'on', 'rate', 'sizes'\]"),
    ({"rate": "fast"}, r"knobs.rate='fast': Value 'fast' of type 'str' could not be converted to Float"),
    ({"count": 2.5}, r"knobs.count=2.5: .*could not be converted to Integer"),
    ({"sizes": [1, "x"]}, r"knobs.sizes\[1\]='x': .*could not be converted to Integer"),
    ({"sizes": 3}, r"knobs.sizes=3: "),
    ({"on": "perhaps"}, r"knobs.on='perhaps': .*not a valid bool"),
    ({"count": 0}, r"knobs.count=0; it must be >= 1"),
])
def test_a_wrong_key_type_or_value_is_an_error_naming_it(given, message):
    with pytest.raises(ValueError, match=message):
        typed_options("knobs", given, Knobs)


def test_sampling_shift_reads_old_and_new_pipeline_files():
    """pipeline.json's flow dict: without resolution_shift (older exports) the constant shift."""
    assert sampling_shift(None, 5000) == 1.0
    assert sampling_shift({"shift": 3.0}, 5000) == 3.0
    full = as_dict(FlowOptions())
    assert sampling_shift(full, 256) == pytest.approx(1.0)
    assert sampling_shift(full, 32760) == pytest.approx(5.0)
    assert sampling_shift(FlowOptions(resolution_shift=False, shift=2.0), 32760) == 2.0
    with pytest.raises(ValueError, match="model.flow: need 0 < base_shift_tokens < max_shift_tokens"):
        sampling_shift(dict(full, base_shift_tokens=40000), 256)
    # the anchors' former names (pipeline.json files of earlier exports)
    former = {"resolution_shift": True, "base_tokens": 64, "base_shift": 1.0, "max_tokens": 4096, "max_shift": 4.0}
    assert sampling_shift(former, 512) == pytest.approx(2.0)  # log-midway between 64 and 4096
