"""Deprecation of renamed and positional arguments, in DIPY's manner.

DIPY marks a renamed argument with ``dipy.utils.deprecator.deprecated_params``
and an argument that became keyword-only with ``warning_for_keywords``; both
compare against DIPY's own version. These do the same for esdmri's: the old
call keeps working, with an :class:`ArgsDeprecationWarning` that names the
new spelling and the version that introduced it.

Examples
--------
>>> @deprecated_params("total_variation", "train_tv", since="0.2")
... def configure(train_tv=0.0):
...     return train_tv
>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     configure(total_variation=1.0)
1.0
"""

import functools
import inspect
import warnings


class ArgsDeprecationWarning(DeprecationWarning):
    """An argument was given under an old name or in an old position."""


def deprecated_params(old_name, new_name, *, since):
    """Accept ``old_name`` as a deprecated spelling of the keyword ``new_name``.

    Parameters
    ----------
    old_name, new_name : str
    since : str
        The esdmri version that renamed it.

    Returns
    -------
    decorator
        The wrapped callable takes ``old_name=value`` as ``new_name=value``
        with an :class:`ArgsDeprecationWarning`; both at once raise TypeError.
    """
    def decorator(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if old_name in kwargs:
                if new_name in kwargs:
                    raise TypeError(f"{function.__qualname__}() got both {old_name!r} and "
                                    f"{new_name!r}: give {new_name!r} only")
                warnings.warn(f"{old_name!r} is deprecated since esdmri {since}: use "
                              f"{new_name!r}", ArgsDeprecationWarning, stacklevel=2)
                kwargs[new_name] = kwargs.pop(old_name)
            return function(*args, **kwargs)
        return wrapper
    return decorator


def renamed_options(options, renames, *, since, stacklevel=3):
    """``options`` with deprecated names replaced by their new ones, with a warning.

    For ``**options`` signatures, where a decorator cannot see the names.

    Parameters
    ----------
    options : dict
    renames : dict of str -> str
        Old name -> new name.
    since : str
    stacklevel : int, optional

    Returns
    -------
    options : dict
        A copy; TypeError if an old and its new name are both given.
    """
    options = dict(options)
    for old_name, new_name in renames.items():
        if old_name not in options:
            continue
        if new_name in options:
            raise TypeError(f"got both {old_name!r} and {new_name!r}: give {new_name!r} only")
        warnings.warn(f"{old_name!r} is deprecated since esdmri {since}: use {new_name!r}",
                      ArgsDeprecationWarning, stacklevel=stacklevel)
        options[new_name] = options.pop(old_name)
    return options


def keyword_only_from(*names, since):
    """Let keyword-only parameters still be passed by position, with a warning.

    Parameters
    ----------
    *names : str
        The keyword-only parameters, in the order in which old calls passed
        them after the positional ones.
    since : str
        The esdmri version that made them keyword-only.

    Returns
    -------
    decorator
    """
    def decorator(function):
        signature = inspect.signature(function)
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                           for p in signature.parameters.values())
        missing = [name for name in names if name not in signature.parameters
                   or signature.parameters[name].kind != inspect.Parameter.KEYWORD_ONLY]
        if missing:
            raise ValueError(f"{function.__qualname__} has no keyword-only {missing}")

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            extra = args[n_positional:]
            if extra:
                if len(extra) > len(names):
                    raise TypeError(f"{function.__qualname__}() takes {n_positional} "
                                    f"positional arguments but {len(args)} were given")
                moved = names[:len(extra)]
                for name, value in zip(moved, extra):
                    if name in kwargs:
                        raise TypeError(f"{function.__qualname__}() got multiple values for "
                                        f"argument {name!r}")
                    kwargs[name] = value
                warnings.warn(f"passing {', '.join(moved)} by position is deprecated since "
                              f"esdmri {since}: pass {', '.join(f'{n}=...' for n in moved)}",
                              ArgsDeprecationWarning, stacklevel=2)
            return function(*args[:n_positional], **kwargs)
        return wrapper
    return decorator
