"""`ipl_layers.models` and `ipl_layers.kernels` come from the same checkout (or install) as `ipl_layers` itself,
whatever other install's editable finder is on the path, and the name `kernels` is not our folder."""

import os
import sys

import ipl_layers
import ipl_layers.kernels
import ipl_layers.models


def test_mapped_packages_come_from_this_checkout():
    root = os.path.dirname(os.path.dirname(os.path.abspath(ipl_layers.__file__)))
    installed = os.path.dirname(os.path.abspath(ipl_layers.__file__))
    for module, folder in ((ipl_layers.models, "models"), (ipl_layers.kernels, "kernels")):
        here = os.path.dirname(os.path.abspath(module.__file__))
        assert here in (os.path.join(root, folder), os.path.join(installed, folder)), here
    top = sys.modules.get("kernels")
    assert top is None or not os.path.samefile(top.__file__, ipl_layers.kernels.__file__)
