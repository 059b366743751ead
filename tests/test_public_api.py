"""The public Python API: every name `raylm` exports stays what it is after every submodule
has been imported (no submodule shadows a public function)."""

from __future__ import annotations

import importlib
import pkgutil
import types

import raylm


def test_every_public_name_survives_importing_every_submodule():
    before = {name: getattr(raylm, name) for name in raylm.__all__}
    imported = [
        m.name
        for m in pkgutil.walk_packages(raylm.__path__, "raylm.")
        if not m.name.endswith("__main__")
    ]  # that one runs the CLI
    for name in imported:
        importlib.import_module(name)
    assert len(imported) > 30  # the wings were walked, not just the top level
    for name in ("run", "train", "tune", "serve", "shutdown", "load_job"):
        value = getattr(raylm, name)
        assert callable(value) and not isinstance(value, types.ModuleType), name
    assert {name: getattr(raylm, name) for name in raylm.__all__} == before
    assert not [m for m in imported if m.rsplit(".", 1)[-1] in raylm.__all__], imported


def test_errors_map_to_the_clis_exit_codes():
    from raylm import errors

    assert issubclass(raylm.JobSpecError, raylm.RaylmError)
    assert errors.JobSpecError(["x"]).exit_code == 2
    assert errors.PathError("p", "missing").exit_code == 2
    assert errors.StorageError("s").exit_code == 2
    assert errors.SettingsChanged("s").exit_code == 2
    assert raylm.GateFailed(["f"]).exit_code == 3
    assert errors.RaylmError("r").exit_code == 1
