"""The ``get_...()`` methods by which the Apps-Engine's accessors hand out the accessors they hold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

_T = TypeVar("_T")


class Getter(Generic[_T]):
    """A ``get_...()`` method returning what its instance holds in ``attribute``.

    ``read.get_user_reader()`` and ``modify.get_creator()`` are methods in the Apps-Engine's
    API, but all the runtime's accessor classes do is hold the accessors: one descriptor
    serves every such method instead of a copied two-line method each.
    """

    def __init__(self, attribute: str, doc: str) -> None:
        self.attribute = attribute
        self.name = ""
        self.__doc__ = doc

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Getter[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any]) -> Callable[[], _T]: ...

    def __get__(self, instance: object | None, owner: type[Any]) -> Getter[_T] | Callable[[], _T]:
        if instance is None:
            return self
        held: _T = getattr(instance, self.attribute)

        def get() -> _T:
            return held

        get.__name__, get.__qualname__, get.__doc__ = self.name, f"{owner.__name__}.{self.name}", self.__doc__
        return get
