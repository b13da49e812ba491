"""The capability document: models, loading, resolution and lint. No I/O beyond reading the file."""

from .loader import load_default, load_path, load_text
from .models import Spec
from .resolve import Binding, Resolution, Target, resolve

__all__ = ["Binding", "Resolution", "Spec", "Target", "load_default", "load_path", "load_text", "resolve"]
