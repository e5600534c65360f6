"""The demo model shipped with the package: a class-conditional TarFlow trained on mnist5k.

docs/demo.md records the command that trained it, its training time and held-out bits/dim."""
from __future__ import annotations

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo-mnist5k.safetensors"


def demo_checkpoint() -> Path:
    """Path of the shipped demo checkpoint (project safetensors format, load with `load_checkpoint`)."""
    if not DEMO_CHECKPOINT.is_file():
        raise FileNotFoundError(f"demo checkpoint missing at {DEMO_CHECKPOINT}: the package was installed "
                                "without its assets (reinstall, or train one with `tarflow-gs train`)")
    return DEMO_CHECKPOINT
