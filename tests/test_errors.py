"""The shared input checks: each names the field, the value and the fix."""

import numpy as np
import pytest

from fedgen.errors import ConfigError, check_fits_in_memory, check_integer, device_memory, machine_memory


@pytest.mark.parametrize("value", [0, 3, np.int64(5), None])
def test_check_integer_accepts_whole_numbers_and_none_where_allowed(value: object) -> None:
    check_integer("data.seed", value, 0, allow_none=True)


@pytest.mark.parametrize("value, allow_none", [(-1, False), (1.0, False), (True, False), ("2", False), (None, False),
                                               (np.float32(2), True)])
def test_check_integer_refuses_anything_else_naming_field_and_fix(value: object, allow_none: bool) -> None:
    with pytest.raises(ConfigError) as err:
        check_integer("data.seed", value, 0, allow_none=allow_none)
    assert err.value.field == "data.seed"
    assert repr(value) in err.value.problem and (" or null" in err.value.problem) == allow_none
    assert "integer >= 0" in err.value.fix


def test_a_device_s_memory_is_the_machine_s_on_the_cpu_and_its_own_on_a_gpu() -> None:
    import torch

    assert device_memory() == device_memory(torch.device("cpu")) == machine_memory() > 0
    gpu = torch.device("cuda")
    own = torch.cuda.get_device_properties(gpu).total_memory if torch.cuda.is_available() else None
    assert device_memory(gpu) == own


def test_a_setting_that_needs_more_than_the_memory_names_it_and_the_fix() -> None:
    total = machine_memory()
    check_fits_in_memory("model.x", total, "the x", "lower x")  # all of it fits
    with pytest.raises(ConfigError, match=r"the x needs about .* GiB of memory, more than this machine's") as err:
        check_fits_in_memory("model.x", total + 1, "the x", "lower x")
    assert err.value.field == "model.x" and err.value.fix == "lower x"


def test_a_fix_given_as_a_function_gets_the_memory_it_was_checked_against() -> None:
    total = machine_memory()
    check_fits_in_memory("model.x", total, "the x", lambda memory: 1 / 0)  # all of it fits: the fix is not asked for
    with pytest.raises(ConfigError) as err:
        check_fits_in_memory("model.x", 2 * total, "the x", lambda memory: f"use x <= {memory // 8}")
    assert err.value.fix == f"use x <= {total // 8}"
