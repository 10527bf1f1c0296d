"""The built-in default corpus: English prose from the docstrings of Python's own standard library.

It needs no download and no file outside the package; every Python installation can rebuild it.
"""
from __future__ import annotations

import importlib
import inspect
import warnings

STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "getopt",
    "gettext", "glob", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "math", "operator", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "typing", "unittest", "urllib", "uuid", "warnings", "weakref",
    "xml", "zipfile", "zlib",
)


def default_corpus(min_words: int = 8) -> str:
    """Docstrings (module, classes, functions) of STDLIB_MODULES, deduplicated, in a fixed order."""
    seen, parts = set(), []
    with warnings.catch_warnings():  # reading deprecated aliases' docs (typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            objects = [module] + [obj for _, obj in sorted(vars(module).items())
                                  if (inspect.isclass(obj) or inspect.isfunction(obj))
                                  and (getattr(obj, "__module__", None) or "").startswith(name)]
            for obj in objects:
                doc = inspect.getdoc(obj)
                if doc and len(doc.split()) >= min_words and doc not in seen:
                    seen.add(doc)
                    parts.append(doc)
    return "\n\n".join(parts)
