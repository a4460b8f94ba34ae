"""torch.fx symbolic tracing: maskops' public functions are leaves of a traced graph.

``torch.fx.symbolic_trace`` runs a module's ``forward`` on ``Proxy`` objects. maskops'
functions validate their arguments and call compiled operators, neither of which a Proxy
can go through, so each public function is a leaf instead: called with a Proxy anywhere in
its arguments (nested in lists, tuples or dicts too), it records one ``call_function`` node
of itself and returns the Proxy of its result; the traced ``GraphModule`` then calls the
function, validation included, on real tensors. That is what ``torch.fx.wrap`` does for
torchvision's ops, but ``torch.fx.wrap`` patches the name in one module's namespace only for
the duration of a trace, so ``maskops.roi_align(...)``, ``from maskops import roi_align`` and
calls from other maskops modules would each need their own registration; a function that
recognises a Proxy argument itself is a leaf however it is reached.

Without a Proxy argument (eager calls, ``torch.compile``, ``torch.export``) the wrapper only
looks at the arguments' types and calls the function.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch.fx

F = TypeVar("F", bound=Callable)


def _find_proxy(x) -> Optional[torch.fx.Proxy]:
    if isinstance(x, torch.fx.Proxy):
        return x
    if isinstance(x, (list, tuple)):
        for y in x:
            p = _find_proxy(y)
            if p is not None:
                return p
    elif isinstance(x, dict):
        for y in x.values():
            p = _find_proxy(y)
            if p is not None:
                return p
    return None


def leaf(fn: F) -> F:
    """Makes ``fn`` a leaf of torch.fx symbolic tracing (see the module docstring)."""

    @functools.wraps(fn)
    def traced_or_called(*args, **kwargs):
        proxy = _find_proxy(args)
        if proxy is None and kwargs:
            proxy = _find_proxy(kwargs)
        if proxy is None:
            return fn(*args, **kwargs)
        # The node's target is this wrapper, the public function: the GraphModule's code
        # calls it like user code would (and re-tracing the GraphModule keeps the leaf).
        return proxy.tracer.create_proxy("call_function", traced_or_called, args, kwargs)

    return traced_or_called  # type: ignore[return-value]
