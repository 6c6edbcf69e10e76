"""The user's DRUM ``custom.py`` hooks: ``init``, ``load_model``, ``score_unstructured``."""

from __future__ import annotations

import ast
import importlib.util
import os
import pickle
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lazy_loading import ConfigError

CUSTOM_MODULE = "custom"
REQUIRED_HOOKS = ("score_unstructured",)
# DRUM's built-in artifact predictors, by extension; we load the pickle ones as DRUM does.
DRUM_ARTIFACT_EXTENSIONS = (".h5", ".onnx", ".pkl", ".pth")
PICKLE_EXTENSIONS = (".pkl",)


@dataclass
class ModelHooks:
    """The hooks, called as DRUM calls them: ``score_unstructured`` at most
    ``max_concurrent`` at a time in a process (DRUM: one), so a model need not be thread-safe."""

    module: ModuleType
    code_dir: Path
    max_concurrent: int = 1

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_concurrent)

    @staticmethod
    def check(code_dir: Path) -> None:
        """Fail before any artifact is downloaded when ``custom.py`` is missing, does not parse,
        or visibly lacks a required hook. It is parsed, not imported: user code must not run
        in a gunicorn master, whose threads and clients every worker would inherit."""
        path = code_dir / "custom.py"
        if not path.is_file():
            raise ConfigError(f"{path} not found: the code dir must contain a custom.py with "
                              "score_unstructured(model, data, **kwargs) and load_model(code_dir) "
                              "(or a model.pkl)")
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except SyntaxError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: {exc.msg}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot be read ({exc})") from None
        defined: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.ImportFrom, ast.Import)):
                if any(alias.name == "*" for alias in node.names):
                    return  # names from a star import cannot be known without running it
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            else:
                defined.update(n.id for n in ast.walk(node)
                               if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined.add(node.name)
        for required in REQUIRED_HOOKS:
            if required not in defined:
                raise ConfigError(f"{path} must define {required}()")

    @classmethod
    def load(cls, code_dir: Path, max_concurrent: int = 1) -> ModelHooks:
        """Import ``<code_dir>/custom.py`` with the code dir on ``sys.path``, as DRUM does."""
        path = code_dir / "custom.py"
        if not path.is_file():
            raise ConfigError(f"{path} not found: the code dir must contain a custom.py with "
                              "score_unstructured(model, data, **kwargs) and load_model(code_dir) "
                              "(or a model.pkl)")
        if str(code_dir) not in sys.path:
            sys.path.insert(0, str(code_dir))
        spec = importlib.util.spec_from_file_location(CUSTOM_MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[CUSTOM_MODULE] = module
        spec.loader.exec_module(module)
        hooks = cls(module, code_dir, max_concurrent)
        for required in REQUIRED_HOOKS:
            if not callable(getattr(module, required, None)):
                raise ConfigError(f"{path} must define {required}()")
        return hooks

    def _hook(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self.module, name, None)
        return fn if callable(fn) else None

    def init(self) -> None:
        fn = self._hook("init")
        if fn is not None:
            fn(code_dir=str(self.code_dir))

    def load_model(self) -> Any:
        """The ``load_model`` hook, or, without one, DRUM's built-in loading: the one model
        artifact at the top of the code dir, unpickled with the model's own libraries."""
        fn = self._hook("load_model")
        if fn is not None:
            return fn(str(self.code_dir))
        artifact = _model_artifact(self.code_dir)
        if not artifact.name.lower().endswith(PICKLE_EXTENSIONS):
            raise ConfigError(f"{artifact}: only pickled models (.pkl) load without a "
                              "load_model() hook here; add load_model(code_dir) to custom.py")
        with open(artifact, "rb") as file:
            try:
                return pickle.load(file, encoding="latin1")
            except TypeError:
                file.seek(0)
                return pickle.load(file)

    def score_unstructured(self, model: Any, data: str | bytes, **kwargs: Any) -> Any:
        fn = self._hook("score_unstructured")
        assert fn is not None
        with self._slots:
            return fn(model, data, **kwargs)


def _model_artifact(code_dir: Path) -> Path:
    names = sorted(os.listdir(code_dir))
    found = [code_dir / name for name in names
             if name.lower().endswith(DRUM_ARTIFACT_EXTENSIONS) and not (code_dir / name).is_dir()]
    if len(found) > 1:
        raise ConfigError(f"multiple serialized model files found in {code_dir} "
                          f"({', '.join(p.name for p in found)}): remove the extra artifacts or "
                          "define load_model(code_dir) in custom.py")
    if not found:
        raise ConfigError(f"custom.py has no load_model() hook and {code_dir} holds no model "
                          f"artifact ({', '.join(DRUM_ARTIFACT_EXTENSIONS)}) to load instead")
    return found[0]
