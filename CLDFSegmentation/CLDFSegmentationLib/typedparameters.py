"""Typed parameters on a real ``vtkMRMLScriptedModuleNode`` where ``slicer.parameterNodeWrapper`` is absent.

Inside Slicer the module uses Slicer's own ``@parameterNodeWrapper`` (with GUI
binding). The slicer-core wheel that scripts and tests run on ships MRML but not
that wrapper; this stand-in reads the same class annotations (``str``, ``int``,
``float``, ``bool``, ``pathlib.Path``, MRML node classes, ``Annotated`` with
`WithinRange` / `Choice`) and stores the values on the node as Slicer's wrapper
does (parameters as text, nodes as references), so a scene reads the same in both.
It offers typed access and validation only, no GUI binding.
"""

from __future__ import annotations

import typing
from pathlib import Path

import slicer

_DEFAULTS = {str: "", int: 0, float: 0.0, bool: False, Path: Path()}
_UNSET = object()


class WithinRange:
    """A number in ``[minimum, maximum]``."""

    def __init__(self, minimum: float, maximum: float):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"must be within [{self.minimum}, {self.maximum}], not {value!r}")


class Choice:
    """One of a fixed set of values."""

    def __init__(self, choices):
        self.choices = tuple(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"must be one of {self.choices}, not {value!r}")


class _Parameter:
    """One annotated field: its type, validators and default; reads and writes it on the node."""

    def __init__(self, name: str, hint, default):
        base, validators = hint, ()
        if typing.get_origin(hint) is typing.Annotated:
            base, *validators = typing.get_args(hint)
        self.name, self.type, self.validators = name, base, tuple(validators)
        self.isNode = isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode)
        if not self.isNode and base not in _DEFAULTS:
            raise TypeError(f"parameter '{name}': type {base} is not supported")
        self.default = default if default is not _UNSET else (None if self.isNode else _DEFAULTS[base])

    def read(self, node):
        if not node.HasParameter(self.name):
            return self.default
        if self.isNode:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        return text == "True" if self.type is bool else self.type(text)

    def write(self, node, value) -> None:
        self.check(value)
        if self.isNode:
            node.SetParameter(self.name, "")  # marks the parameter as set, also to None
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))

    def check(self, value) -> None:
        allowed = (int, float) if self.type is float else self.type
        if (value is None and not self.isNode) or (value is not None and not isinstance(value, allowed)):
            raise TypeError(f"{self.name} must be a {self.type.__name__}, not {value!r}")
        try:
            for validator in self.validators:
                validator.validate(value)
        except ValueError as e:
            raise ValueError(f"{self.name} {e}") from None


def parameterNodeWrapper(cls):
    """Class decorator: one typed property per annotation, stored on the wrapped ``vtkMRMLScriptedModuleNode``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {name: _Parameter(name, hint, cls.__dict__.get(name, _UNSET)) for name, hint in hints.items()}
    for name, parameter in parameters.items():
        setattr(cls, name, property(lambda self, p=parameter: p.read(self.parameterNode),
                                    lambda self, value, p=parameter: p.write(self.parameterNode, value)))

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for parameter in parameters.values():  # defaults are written once, as Slicer's wrapper does
            if not parameterNode.HasParameter(parameter.name):
                parameter.write(parameterNode, parameter.default)

    cls.__init__ = __init__
    cls.allParameters = parameters
    cls.getValue = lambda self, name: getattr(self, name)
    cls.setValue = lambda self, name, value: setattr(self, name, value)
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback,
                                                                                                   priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    cls.StartModify = lambda self: self.parameterNode.StartModify()
    cls.EndModify = lambda self, wasModifying: self.parameterNode.EndModify(wasModifying)
    return cls
