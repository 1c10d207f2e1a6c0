"""Reference balloon policies (issue 14), and finding a policy by name.

Built in (each module's docstring gives its source and how it differs from it):

- ``mom``: oVirt MOM's default ``balloon.rules`` + ``balloon-qos.rules`` (:class:`MomPolicy`);
- ``qmemman``: Qubes OS qmemman's proportional share (:class:`QmemmanPolicy`);
- ``psi``: hypeman-like reclaim under host pressure (MemAvailable, PSI), with hysteresis
  (:class:`PsiPolicy`);
- ``pi``: a PI controller on the host's used memory (:class:`PiPolicy`).

A policy is any ``callable(view) -> {guest: bytes} | Decision`` (:mod:`balloonlab.model.policy`);
:func:`load_policy` makes one from a built-in name or a ``module:callable`` spec.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from balloonlab.model.policy import Policy
from balloonlab.policies.mom import MomPolicy
from balloonlab.policies.pi import PiPolicy
from balloonlab.policies.psi import PsiPolicy
from balloonlab.policies.qmemman import QmemmanPolicy

__all__ = ["POLICIES", "MomPolicy", "PiPolicy", "PsiPolicy", "QmemmanPolicy", "load_policy"]

#: The built-in policies by name: each makes a fresh policy with its defaults.
POLICIES: dict[str, Callable[[], Policy]] = {
    "mom": MomPolicy,
    "qmemman": QmemmanPolicy,
    "psi": PsiPolicy,
    "pi": PiPolicy,
}


def load_policy(spec: str) -> Policy:
    """A policy from ``spec``: a built-in name (:data:`POLICIES`), or ``module:callable`` (a
    dotted attribute path after the colon). A class is instantiated with no arguments; any other
    callable is the policy itself.

    :raises ValueError: the name is unknown, the module cannot be imported, it has no such
        attribute, the class needs arguments, or the object is not callable (the message names
        what was wrong and the built-in names).
    """
    builtin = ", ".join(sorted(POLICIES))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a policy is a built-in name ({builtin}) or 'module:callable', got {spec!r}")
    spec = spec.strip()
    if spec in POLICIES:
        return POLICIES[spec]()
    module_name, colon, attribute = spec.partition(":")
    if not colon:
        raise ValueError(f"unknown policy {spec!r}: the built-in policies are {builtin}; "
                         "a policy of your own is given as 'module:callable'")
    if not module_name or not attribute:
        raise ValueError(f"policy {spec!r}: give both the module and the callable, as 'module:callable' "
                         f"(or a built-in name: {builtin})")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"policy {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"policy {spec!r}: {module_name!r} has no attribute {attribute!r} "
                             f"(built-in policies: {builtin})") from None
    if isinstance(target, type):
        cls = target
        try:
            target = cls()
        except TypeError as exc:
            raise ValueError(f"policy {spec!r}: the class {cls.__qualname__} cannot be made with no "
                             f"arguments: {exc}") from exc
    if not callable(target):
        raise ValueError(f"policy {spec!r}: {attribute!r} is a {type(target).__name__}, not a callable "
                         f"taking a PolicyView (built-in policies: {builtin})")
    return target
