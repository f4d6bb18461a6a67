"""The code a reader copies from METHOD.md runs as written."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of METHOD.md's section `section` (e.g. "§9")."""
    text = (ROOT / "METHOD.md").read_text()
    start = text.index(f"## {section} ")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_the_any_backbone_example_trains_a_step():
    blocks = python_blocks("§9")
    assert blocks, "METHOD §9 shows how to wrap a model"
    torch.manual_seed(0)
    scope = {"x": torch.randn(4, 3, 32, 32), "y": torch.randint(0, 10, (4,))}
    exec(compile(blocks[0], "METHOD.md §9", "exec"), scope)  # noqa: S102 - the document's own example
    logits, losses = scope["logits"], scope["losses"]
    assert logits.shape == (4, 10) and len(losses) == scope["net"].k == 4
    assert all(torch.isfinite(torch.as_tensor(loss)) for loss in losses)
    assert all(p.grad is not None for p in scope["net"].blocks[0].parameters())  # the step ran its backward
