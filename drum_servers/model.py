"""The user's DRUM ``custom.py`` hooks: ``init``, ``load_model``, ``score_unstructured``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lazy_loading import ConfigError

CUSTOM_MODULE = "custom"


@dataclass
class ModelHooks:
    module: ModuleType
    code_dir: Path

    @classmethod
    def load(cls, code_dir: Path) -> ModelHooks:
        """Import ``<code_dir>/custom.py`` with the code dir on ``sys.path``, as DRUM does."""
        path = code_dir / "custom.py"
        if not path.is_file():
            raise ConfigError(f"{path} not found: the code dir must contain a custom.py with "
                              "load_model(code_dir) and score_unstructured(model, data, **kwargs)")
        if str(code_dir) not in sys.path:
            sys.path.insert(0, str(code_dir))
        spec = importlib.util.spec_from_file_location(CUSTOM_MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[CUSTOM_MODULE] = module
        spec.loader.exec_module(module)
        hooks = cls(module, code_dir)
        for required in ("load_model", "score_unstructured"):
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
        fn = self._hook("load_model")
        assert fn is not None
        return fn(str(self.code_dir))

    def score_unstructured(self, model: Any, data: str | bytes, **kwargs: Any) -> Any:
        fn = self._hook("score_unstructured")
        assert fn is not None
        return fn(model, data, **kwargs)
