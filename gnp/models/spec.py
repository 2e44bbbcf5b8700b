"""What a model is: registry name, input shape and number of outputs."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """Registry name, input shape (C, H, W for images) and number of classes (or symbols)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def image(self) -> tuple[int, int, int]:
        """(C, H, W), or ValueError for a model that needs an image input."""
        if len(self.input_shape) != 3:
            raise ValueError(f"{self.name} needs input_shape (C, H, W), got {self.input_shape}")
        c, h, w = self.input_shape
        return c, h, w
