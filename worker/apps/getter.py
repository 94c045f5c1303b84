"""The ``get_...()`` methods by which the Apps-Engine's accessors hand out the accessors they hold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

_T = TypeVar("_T")


class Getter(Generic[_T]):
    """A ``get_...()`` method returning what its instance holds in ``attribute``.

    ``read.get_user_reader()`` and ``modify.get_creator()`` are methods in the Apps-Engine's
    API, but all the runtime's accessor classes do is hold the accessors: one descriptor
    serves every such method instead of a copied two-line method each. The accessors of a
    handler run are made per event and most runs use one or two of them, so an attribute
    still None is made on first use by the instance's ``_build(attribute)``.

    At class creation the descriptor puts a plain function in its place: a getter is then
    an ordinary method, with no object made per call.
    """

    def __init__(self, attribute: str, doc: str) -> None:
        self.attribute = attribute
        self.__doc__ = doc

    def __set_name__(self, owner: type[Any], name: str) -> None:
        attribute = self.attribute

        def get(instance: Any) -> Any:
            held = getattr(instance, attribute)
            return instance._build(attribute) if held is None else held

        get.__name__, get.__qualname__, get.__doc__ = name, f"{owner.__qualname__}.{name}", self.__doc__
        setattr(owner, name, get)

    # For type checkers only: at run time the class holds the plain function made above.
    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Getter[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any]) -> Callable[[], _T]: ...

    def __get__(self, instance: object | None, owner: type[Any]) -> Getter[_T] | Callable[[], _T]:  # pragma: no cover - replaced
        raise TypeError(f"{owner.__name__}: a Getter used outside a class body")
