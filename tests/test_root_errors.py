"""The root half's wire codes are a subset of every process's, with the same names and values."""

from __future__ import annotations

import mep.errors
import mep.root.errors
from mep.errors import AssertionRefusedError, ErrorCode, error_for_code


def test_root_codes_are_among_the_wire_codes_with_the_same_values() -> None:
    for code in mep.root.errors.ErrorCode:
        assert ErrorCode[code.name] == code and hash(ErrorCode[code.name]) == hash(code)
        assert ErrorCode(code) is ErrorCode[code.name]


def test_every_assertion_code_comes_back_as_one_error_type_carrying_it() -> None:
    for code in (ErrorCode.ASSERTION_MISSING, ErrorCode.ASSERTION_INVALID, ErrorCode.ASSERTION_EXPIRED,
                 ErrorCode.ASSERTION_REPLAYED, ErrorCode.ASSERTION_MISMATCH):
        error = error_for_code(code, "refused")
        assert isinstance(error, AssertionRefusedError) and error.code == code and str(error) == "refused"
    assert isinstance(error_for_code("unmapped", "no"), mep.errors.UnmappedIdentityError)
