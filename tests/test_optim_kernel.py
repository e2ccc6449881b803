"""The C kernel's loader: the struct layout check, and what ships (no benchmark-only code)."""
import ctypes

import pytest

from largebatch.optim import kernel

pytestmark = pytest.mark.skipif(not kernel.available(), reason="C kernel unavailable")


def test_struct_layout_matches_the_ctypes_mirrors():
    kernel.check_layout(kernel.library())  # also done on load: passes silently


def _mirror(fields):
    return type("CLambHyper", (ctypes.Structure,), {"_fields_": fields})


@pytest.mark.parametrize("edit", ["swap", "int_as_double", "missing"])
def test_a_mirror_that_differs_from_the_c_struct_is_refused(edit):
    fields = list(kernel.CLambHyper._fields_)
    if edit == "swap":
        fields[0], fields[1] = fields[1], fields[0]
    elif edit == "int_as_double":
        fields[-1] = (fields[-1][0], ctypes.c_double)
    else:
        fields.pop(4)
    with pytest.raises(kernel.KernelLayoutError, match="CLambHyper does not match the C struct"):
        kernel.check_layout(kernel.library(), (_mirror(fields), kernel.CLarsHyper))


def test_the_shipped_library_has_no_profile_or_probe_symbols():
    lib = kernel.library()
    for name in ("lb_triad_f32", "lb_profile_set_phase"):
        with pytest.raises(AttributeError):
            getattr(lib, name)
