"""The shared input checks: each names the field, the value and the fix."""

import numpy as np
import pytest

from fedgen.errors import ConfigError, check_integer


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
