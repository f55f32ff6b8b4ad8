"""The public Python API: what ``raafd/__init__.py`` exports, loaded on first use."""

from __future__ import annotations

import pytest

import raafd
from raafd import errors


def test_every_export_resolves_to_the_object_of_its_module() -> None:
    assert sorted(raafd.__all__) == sorted([*raafd._EXPORTS, "__version__"])
    for name, module in raafd._EXPORTS.items():
        value = getattr(raafd, name)
        assert value.__module__ == module, name
        assert name in dir(raafd)


def test_every_error_class_is_public() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.RaafdError)
    ]
    assert classes and all(getattr(raafd, cls.__name__) is cls for cls in classes)


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        raafd.no_such_thing  # noqa: B018
    from raafd import config  # a module, not an export

    assert config.load_config is raafd.load_config
